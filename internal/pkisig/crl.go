package pkisig

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"sync"
	"time"
)

// CRLSource supplies a CA's current CRL.
type CRLSource interface {
	CRL(ctx context.Context) (*x509.RevocationList, error)
}

// CachedCRL keeps the CRL from Source for at most MaxAge (default one
// minute) and never past the CRL's NextUpdate, so that a busy verifier or backend
// does not fetch the CRL for every use. A revocation therefore takes
// effect within MaxAge. When a refresh fails, the error is returned (the caller fails
// closed) and the next use tries again. Use
// it by pointer; it is safe for concurrent use.
type CachedCRL struct {
	Source CRLSource
	MaxAge time.Duration

	mu      sync.Mutex
	crl     *x509.RevocationList
	fetched time.Time
}

// CRL implements CRLSource.
func (c *CachedCRL) CRL(ctx context.Context) (*x509.RevocationList, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	maxAge := c.MaxAge
	if maxAge <= 0 {
		maxAge = time.Minute
	}
	now := time.Now()
	if c.crl != nil && now.Sub(c.fetched) < maxAge && (c.crl.NextUpdate.IsZero() || now.Before(c.crl.NextUpdate)) {
		return c.crl, nil
	}
	crl, err := c.Source.CRL(ctx)
	if err != nil {
		return nil, err
	}
	c.crl, c.fetched = crl, now
	return crl, nil
}

// HTTPCRL fetches a CA's CRL from its HTTP endpoint (`cvtpm ca
// --http`, path /crl, DER) on every use; wrap it in CachedCRL to fetch it
// less often.
type HTTPCRL struct {
	URL    string
	Client *http.Client
}

// CRL implements CRLSource.
func (h HTTPCRL) CRL(ctx context.Context) (*x509.RevocationList, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.URL, nil)
	if err != nil {
		return nil, err
	}
	c := h.Client
	if c == nil {
		c = &http.Client{Timeout: 10 * time.Second}
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching the CRL: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetching the CRL: %s", resp.Status)
	}
	der, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("fetching the CRL: %w", err)
	}
	return x509.ParseRevocationList(der)
}

// CRLFloor remembers the highest CRL number seen per issuer and refuses
// an older list: a relay (the host, for a backend) could otherwise keep
// serving the list from before a revocation until its NextUpdate. Safe
// for concurrent use; the zero value is ready.
type CRLFloor struct {
	mu   sync.Mutex
	seen map[string]*big.Int
}

// Check accepts crl, which must already be known to be signed by its
// issuer, unless a newer list of the same issuer was seen before.
func (f *CRLFloor) Check(crl *x509.RevocationList) error {
	if crl.Number == nil {
		return fmt.Errorf("the CRL of %q has no CRL number: its age cannot be told", crl.Issuer.CommonName)
	}
	key := string(crl.RawIssuer) + "\x00" + string(crl.AuthorityKeyId)
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seen == nil {
		f.seen = map[string]*big.Int{}
	}
	if prev := f.seen[key]; prev != nil && crl.Number.Cmp(prev) < 0 {
		return fmt.Errorf("the CRL of %q is number %v, older than number %v already seen (replayed?): refused until a current one is at hand", crl.Issuer.CommonName, crl.Number, prev)
	}
	f.seen[key] = new(big.Int).Set(crl.Number)
	return nil
}
