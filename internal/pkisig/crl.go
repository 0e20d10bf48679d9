package pkisig

import (
	"context"
	"crypto/x509"
	"fmt"
	"io"
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
