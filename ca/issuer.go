package ca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"math/big"
	"time"

	"github.com/emmansun/gmsm/sm2"
	"github.com/emmansun/gmsm/smx509"

	"cvtpm/internal/pkisig"
)

// SM2Issuer is a CA key and certificate of SM2 with SM3 (gmsm smx509), for
// domestic PKIs. Go's crypto/x509 can neither parse nor use such a key, so
// an Authority with SM2 set signs and checks through gmsm; relying parties
// check its certificates with an SM2-capable library (gmsm, OpenSSL 3).
type SM2Issuer struct {
	Cert *smx509.Certificate
	Key  *sm2.PrivateKey
}

// rootDER is the CA certificate.
func (a *Authority) rootDER() []byte {
	if a.SM2 != nil {
		return a.SM2.Cert.Raw
	}
	return a.Issuer.Raw
}

func (a *Authority) subjectKeyID() []byte {
	if a.SM2 != nil {
		return a.SM2.Cert.SubjectKeyId
	}
	return a.Issuer.SubjectKeyId
}

// signCert signs tmpl for pub with the CA key.
func (a *Authority) signCert(tmpl *x509.Certificate, pub any) (*x509.Certificate, error) {
	var der []byte
	var err error
	if a.SM2 != nil {
		der, err = smx509.CreateCertificate(rand.Reader, toSM2Template(tmpl), a.SM2.Cert, pub, a.SM2.Key)
	} else {
		der, err = x509.CreateCertificate(rand.Reader, tmpl, a.Issuer, pub, a.Signer)
	}
	if err != nil {
		return nil, err
	}
	// crypto/x509 parses an SM2-signed certificate of an RSA or ECDSA key;
	// only the signature algorithm is unknown to it.
	return x509.ParseCertificate(der)
}

// issuedByUs checks that certDER carries this CA's signature.
func (a *Authority) issuedByUs(certDER []byte) error {
	return pkisig.SignedBy(certDER, a.rootDER())
}

// CRL signs a revocation list of everything revoked so far, valid for
// validity (default 24 h).
//
// The signed list is kept and served again while nothing was revoked since
// and less than half its validity has passed: an unauthenticated /crl
// request costs a store read, not a signature and a new CRL number (the
// store is read each time, so another replica's revocation shows at once).
func (a *Authority) CRL(ctx context.Context, validity time.Duration) ([]byte, error) {
	st := a.Store
	if st == nil {
		st = noStore{} // nothing can have been revoked
	}
	entries, err := st.Revoked(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing revocations: %w", err)
	}
	h := sha256.New()
	fmt.Fprint(h, validity)
	for _, e := range entries {
		fmt.Fprint(h, e.SerialNumber, e.RevocationTime.UnixNano(), e.ReasonCode)
	}
	key := h.Sum(nil)
	a.crlMu.Lock()
	defer a.crlMu.Unlock()
	if a.crlDER != nil && bytes.Equal(key, a.crlKey) && time.Now().Before(a.crlRefresh) {
		return a.crlDER, nil
	}
	der, err := a.signCRL(ctx, st, validity)
	if err != nil {
		return nil, err
	}
	if validity <= 0 {
		validity = 24 * time.Hour
	}
	a.crlDER, a.crlKey, a.crlRefresh = der, key, time.Now().Add(validity/2)
	return der, nil
}

func (a *Authority) signCRL(ctx context.Context, st Store, validity time.Duration) ([]byte, error) {
	if a.SM2 == nil {
		return CRL(ctx, st, a.Issuer, a.Signer, validity)
	}
	tmpl, err := crlTemplate(ctx, st, validity)
	if err != nil {
		return nil, err
	}
	var sm []smx509.RevocationListEntry
	for _, e := range tmpl.RevokedCertificateEntries {
		sm = append(sm, smx509.RevocationListEntry{SerialNumber: e.SerialNumber, RevocationTime: e.RevocationTime, ReasonCode: e.ReasonCode})
	}
	return smx509.CreateRevocationList(rand.Reader, &smx509.RevocationList{
		RevokedCertificateEntries: sm, Number: tmpl.Number, ThisUpdate: tmpl.ThisUpdate, NextUpdate: tmpl.NextUpdate,
	}, a.SM2.Cert, a.SM2.Key)
}

// toSM2Template carries the fields cvtpm's templates use over to gmsm's
// certificate type.
func toSM2Template(t *x509.Certificate) *smx509.Certificate {
	c := &smx509.Certificate{
		SerialNumber: t.SerialNumber, Subject: t.Subject,
		NotBefore: t.NotBefore, NotAfter: t.NotAfter,
		KeyUsage:              smx509.KeyUsage(t.KeyUsage),
		UnknownExtKeyUsage:    t.UnknownExtKeyUsage,
		BasicConstraintsValid: t.BasicConstraintsValid, IsCA: t.IsCA,
		MaxPathLen: t.MaxPathLen, MaxPathLenZero: t.MaxPathLenZero,
		SubjectKeyId: t.SubjectKeyId, AuthorityKeyId: t.AuthorityKeyId,
		DNSNames: t.DNSNames, EmailAddresses: t.EmailAddresses, IPAddresses: t.IPAddresses, URIs: t.URIs,
		ExtraExtensions: t.ExtraExtensions,
	}
	for _, u := range t.ExtKeyUsage {
		c.ExtKeyUsage = append(c.ExtKeyUsage, smx509.ExtKeyUsage(u))
	}
	return c
}

// noStore is the Store of a CA that keeps none: it has revoked nothing.
type noStore struct{}

func (noStore) PutIssued(context.Context, IssuedCert) error                 { return nil }
func (noStore) Revoke(context.Context, string, time.Time, int) error        { return ErrUnknownSerial }
func (noStore) Revoked(context.Context) ([]x509.RevocationListEntry, error) { return nil, nil }
func (noStore) Issued(context.Context, string) (IssuedCert, error) {
	return IssuedCert{}, ErrUnknownSerial
}
func (noStore) NextCRLNumber(context.Context) (*big.Int, error) { return big.NewInt(1), nil }
