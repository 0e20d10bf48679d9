package backend

import (
	"context"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"cvtpm/internal/pkisig"
)

// ClientRevocation refuses link client certificates that their CA has
// revoked (`cvtpm ca revoke`), from the CA's CRL. It fails closed: while
// no CRL signed by one of Issuers and within its NextUpdate is at hand, no
// client is admitted.
type ClientRevocation struct {
	// CRL is the CA's CRL, typically a pkisig.CachedCRL over the CA's
	// HTTP /crl, so a revocation takes effect within its MaxAge.
	CRL pkisig.CRLSource
	// Issuers are the link client CA certificates (--client-ca).
	Issuers []*x509.Certificate

	mu       sync.Mutex
	last     *x509.RevocationList
	revoked  map[string]bool            // serials of last
	signedBy map[*x509.Certificate]bool // issuers whose signature on last was checked
	floor    pkisig.CRLFloor
}

// Check returns an error if cert is revoked or the CRL cannot vouch for it.
func (r *ClientRevocation) Check(ctx context.Context, cert *x509.Certificate) error {
	crl, err := r.CRL.CRL(ctx)
	if err != nil {
		return fmt.Errorf("the link CA's CRL is unavailable (clients are refused until it is): %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// The list must be the one of the CA that issued this certificate:
	// another --client-ca's CRL says nothing about it.
	issuer := r.issuerOf(cert)
	if issuer == nil {
		return fmt.Errorf("client certificate %q: no --client-ca certificate issued it", cert.Subject.CommonName)
	}
	if crl != r.last {
		r.last, r.revoked, r.signedBy = nil, map[string]bool{}, map[*x509.Certificate]bool{}
		for _, e := range crl.RevokedCertificateEntries {
			r.revoked[e.SerialNumber.String()] = true
		}
	}
	if !r.signedBy[issuer] {
		if err := crl.CheckSignatureFrom(issuer); err != nil {
			return fmt.Errorf("the CRL at hand (of %q) is not the CRL of %q, which issued client certificate %q: clients are refused until it is", crl.Issuer.CommonName, issuer.Subject.CommonName, cert.Subject.CommonName)
		}
		if err := r.floor.Check(crl); err != nil {
			return err
		}
		r.signedBy[issuer] = true
	}
	r.last = crl
	if !crl.NextUpdate.IsZero() && time.Now().After(crl.NextUpdate) {
		return fmt.Errorf("the link CA's CRL is stale (next update was due %s): clients are refused until a fresh one is at hand", crl.NextUpdate.UTC().Format(time.RFC3339))
	}
	if r.revoked[cert.SerialNumber.String()] {
		return fmt.Errorf("client certificate %q (serial %x) was revoked", cert.Subject.CommonName, cert.SerialNumber)
	}
	return nil
}

func (r *ClientRevocation) issuerOf(cert *x509.Certificate) *x509.Certificate {
	for _, iss := range r.Issuers {
		if cert.CheckSignatureFrom(iss) == nil {
			return iss
		}
	}
	return nil
}
