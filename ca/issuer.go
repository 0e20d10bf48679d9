package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"time"

	"github.com/emmansun/gmsm/sm2"
	"github.com/emmansun/gmsm/smx509"

	"cvtpm/internal/pkisig"
)

// Purpose names what an issuing CA certifies. The CA keeps one root per
// purpose, so a relying party that trusts the EK root (or the AK root)
// never trusts a link identity, and the other way round: a certificate of
// one kind cannot stand in for another even where a relying party checks
// nothing but the chain (openssl verify, go-tpm-tools' TrustedRootCerts).
type Purpose string

const (
	// PurposeEK: EK certificates (TCG EK profile, CSV claims).
	PurposeEK Purpose = "ek"
	// PurposeAK: AK certificates (TCG AK EKU, the certifying EK).
	PurposeAK Purpose = "ak"
	// PurposeIdentity: link identities and the CA service's own TLS
	// certificate (serverAuth, clientAuth).
	PurposeIdentity Purpose = "identity"
)

// Purposes lists every root a CA directory holds, EK first.
var Purposes = []Purpose{PurposeEK, PurposeAK, PurposeIdentity, PurposeService}

// PurposeService is the CA service's own root: it signs the TLS
// certificate of the CA's gRPC port and the key broker's answers, nothing
// that the Authority issues.
const PurposeService Purpose = "service"

// RootFileName is where `cvtpm ca` keeps a purpose's root in its
// directory (the key beside it, .key for .pem). ca.pem stays the EK root:
// EK certificates issued before the split still chain to it.
func RootFileName(p Purpose) string {
	if p == PurposeEK {
		return "ca.pem"
	}
	return string(p) + "-ca.pem"
}

// ParsePurpose reads a purpose name ("" is the EK issuer, for clients
// that predate the split).
func ParsePurpose(s string) (Purpose, error) {
	switch Purpose(s) {
	case "", PurposeEK:
		return PurposeEK, nil
	case PurposeAK, PurposeIdentity:
		return Purpose(s), nil
	}
	return "", fmt.Errorf("unknown issuer %q: want ek, ak or identity", s)
}

// SM2Issuer is a CA key and certificate of SM2 with SM3 (gmsm smx509), for
// domestic PKIs. Go's crypto/x509 can neither parse nor use such a key, so
// an Issuer with SM2 set signs and checks through gmsm; relying parties
// check its certificates with an SM2-capable library (gmsm, OpenSSL 3).
type SM2Issuer struct {
	Cert *smx509.Certificate
	Key  *sm2.PrivateKey
}

// Issuer is one issuing CA: its certificate and key, either crypto/x509's
// (Cert, Signer) or SM2's.
type Issuer struct {
	Cert   *x509.Certificate
	Signer crypto.Signer
	SM2    *SM2Issuer

	crlMu      sync.Mutex // the last signed CRL, served again while unchanged
	crlDER     []byte
	crlKey     []byte
	crlRefresh time.Time
}

// DER is the issuer's certificate.
func (i *Issuer) DER() []byte {
	if i.SM2 != nil {
		return i.SM2.Cert.Raw
	}
	return i.Cert.Raw
}

func (i *Issuer) rawSubject() []byte {
	if i.SM2 != nil {
		return i.SM2.Cert.RawSubject
	}
	return i.Cert.RawSubject
}

// SubjectKeyID is the issuer's key identifier (the AKI of what it signs).
func (i *Issuer) SubjectKeyID() []byte {
	if i.SM2 != nil {
		return i.SM2.Cert.SubjectKeyId
	}
	return i.Cert.SubjectKeyId
}

// Sign signs tmpl for pub with the issuer's key.
func (i *Issuer) Sign(tmpl *x509.Certificate, pub any) (*x509.Certificate, error) {
	var der []byte
	var err error
	if i.SM2 != nil {
		der, err = smx509.CreateCertificate(rand.Reader, toSM2Template(tmpl), i.SM2.Cert, pub, i.SM2.Key)
	} else {
		der, err = x509.CreateCertificate(rand.Reader, tmpl, i.Cert, pub, i.Signer)
	}
	if err != nil {
		return nil, err
	}
	// crypto/x509 parses an SM2-signed certificate of an RSA or ECDSA key;
	// only the signature algorithm is unknown to it.
	return x509.ParseCertificate(der)
}

// Signed checks that certDER carries this issuer's signature.
func (i *Issuer) Signed(certDER []byte) error {
	return pkisig.SignedBy(certDER, i.DER())
}

// issuerOf returns the issuer for p, or an error if this CA has none.
func (a *Authority) issuerOf(p Purpose) (*Issuer, error) {
	var i *Issuer
	switch p {
	case PurposeEK:
		i = a.EKIssuer
	case PurposeAK:
		i = a.AKIssuer
	case PurposeIdentity:
		i = a.IdentityIssuer
	}
	if i == nil {
		return nil, fmt.Errorf("this CA has no %s issuer", p)
	}
	return i, nil
}

// Root is the certificate (DER) of the issuer for p.
func (a *Authority) Root(p Purpose) ([]byte, error) {
	i, err := a.issuerOf(p)
	if err != nil {
		return nil, err
	}
	return i.DER(), nil
}

// ErrNoIssuer: the CA has no issuer for the requested purpose.
var ErrNoIssuer = errors.New("no issuer for this purpose")

// CRL signs the revocation list of the issuer for p: every revoked
// certificate that issuer signed, valid for validity (default 24 h).
//
// The signed list is kept and served again while nothing was revoked since
// and less than half its validity has passed: an unauthenticated /crl
// request costs a store read, not a signature and a new CRL number (the
// store is read each time, so another replica's revocation shows at once).
func (a *Authority) CRL(ctx context.Context, p Purpose, validity time.Duration) ([]byte, error) {
	is, err := a.issuerOf(p)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoIssuer, err)
	}
	st := a.Store
	if st == nil {
		st = noStore{} // nothing can have been revoked
	}
	all, err := st.Revoked(ctx)
	if err != nil {
		return nil, fmt.Errorf("listing revocations: %w", err)
	}
	// Each issuer lists what it signed: the store records every
	// certificate, so the issuer name of the stored DER tells.
	var entries []x509.RevocationListEntry
	for _, e := range all {
		rec, err := st.Issued(ctx, e.SerialNumber.Text(16))
		if err != nil {
			return nil, fmt.Errorf("revoked serial %s: %w", e.SerialNumber.Text(16), err)
		}
		c, err := x509.ParseCertificate(rec.DER)
		if err != nil || !bytes.Equal(c.RawIssuer, is.rawSubject()) {
			continue
		}
		entries = append(entries, e)
	}
	h := sha256.New()
	fmt.Fprint(h, validity)
	for _, e := range entries {
		fmt.Fprint(h, e.SerialNumber, e.RevocationTime.UnixNano(), e.ReasonCode)
	}
	key := h.Sum(nil)
	is.crlMu.Lock()
	defer is.crlMu.Unlock()
	if is.crlDER != nil && bytes.Equal(key, is.crlKey) && time.Now().Before(is.crlRefresh) {
		return is.crlDER, nil
	}
	der, err := is.signCRL(ctx, st, entries, validity)
	if err != nil {
		return nil, err
	}
	if validity <= 0 {
		validity = 24 * time.Hour
	}
	is.crlDER, is.crlKey, is.crlRefresh = der, key, time.Now().Add(validity/2)
	return der, nil
}

func (i *Issuer) signCRL(ctx context.Context, st Store, entries []x509.RevocationListEntry, validity time.Duration) ([]byte, error) {
	tmpl, err := crlTemplate(ctx, st, entries, validity)
	if err != nil {
		return nil, err
	}
	if i.SM2 == nil {
		return x509.CreateRevocationList(rand.Reader, tmpl, i.Cert, i.Signer)
	}
	var sm []smx509.RevocationListEntry
	for _, e := range tmpl.RevokedCertificateEntries {
		sm = append(sm, smx509.RevocationListEntry{SerialNumber: e.SerialNumber, RevocationTime: e.RevocationTime, ReasonCode: e.ReasonCode})
	}
	return smx509.CreateRevocationList(rand.Reader, &smx509.RevocationList{
		RevokedCertificateEntries: sm, Number: tmpl.Number, ThisUpdate: tmpl.ThisUpdate, NextUpdate: tmpl.NextUpdate,
	}, i.SM2.Cert, i.SM2.Key)
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
