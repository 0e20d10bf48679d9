package verifier

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"cvtpm/attest/csv"
)

type review11CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// newReview11CA makes a root named as `cvtpm ca` names every EK root it
// creates (cmd/cvtpm/ca.go createRoot): all cvtpm CAs share this name.
func newReview11CA(t *testing.T) review11CA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cvtpm EK CA", Organization: []string{"cvtpm"}},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return review11CA{c, key}
}

func (c review11CA) crl(t *testing.T, revoked ...*big.Int) *x509.RevocationList {
	var entries []x509.RevocationListEntry
	for _, s := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: s, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: time.Now().Add(-time.Minute),
		NextUpdate: time.Now().Add(time.Hour), RevokedCertificateEntries: entries}, c.cert, c.key)
	if err != nil {
		t.Fatal(err)
	}
	l, _ := x509.ParseRevocationList(der)
	return l
}

type fixedCRL struct{ l *x509.RevocationList }

func (f fixedCRL) CRL(context.Context) (*x509.RevocationList, error) { return f.l, nil }

// Review 11: the verifier picks "the CRL of the certificate's issuer" by
// issuer name and accepts it if any trusted root of that name signed it.
// Every `cvtpm ca` names its EK root "cvtpm EK CA, O=cvtpm", so a verifier
// that trusts two CAs (--ek-root with both ca.pem, --crl for each) looks
// CA B's certificates up in CA A's CRL (the first whose name matches):
// B's revocations are never seen. The relay (plain HTTP) can also just
// serve A's CRL at B's URL.
func TestReview11CRLOfAnotherRootWithTheSameName(t *testing.T) {
	a, b := newReview11CA(t), newReview11CA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(4242), Subject: pkix.Name{CommonName: "EK"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, b.cert, &key.PublicKey, b.key)
	if err != nil {
		t.Fatal(err)
	}
	ekOfB, _ := x509.ParseCertificate(der)
	v, err := New(context.Background(), Options{EKRoots: [][]byte{a.cert.Raw, b.cert.Raw}, AKRoots: [][]byte{b.cert.Raw},
		CRLs: []CRLSource{fixedCRL{a.crl(t)}, fixedCRL{b.crl(t, ekOfB.SerialNumber)}},
		CSV:  &csv.AppraisalPolicy{}, Signer: key})
	if err != nil {
		t.Fatal(err)
	}
	revoked, err := v.revoked(context.Background(), ekOfB)
	if err != nil {
		t.Fatal(err)
	}
	if !revoked {
		t.Fatal("a certificate revoked by CA B was looked up in CA A's CRL (same issuer name) and found not revoked")
	}
}

// Review 11: the library takes CSVCerts == nil as "use the HSK+CEK the
// evidence carries" and accepts a CSV policy with chip allow/deny lists in
// that mode, which the CLI refuses (csv.ErrEvidenceCertsWithChipLists):
// an embedder of verifier.New gets chip lists that a rewritten (only
// MACed) chip serial passes, with no warning.
func TestReview11NewRefusesChipListsWithEvidenceCerts(t *testing.T) {
	ca := newReview11CA(t)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	_, err := New(context.Background(), Options{EKRoots: [][]byte{ca.cert.Raw}, AKRoots: [][]byte{ca.cert.Raw},
		CSV: &csv.AppraisalPolicy{DenyChips: []string{"NZA9TDENIED"}}, Signer: key})
	if err == nil {
		t.Fatal("verifier.New accepted deny_chips with the evidence's own HSK+CEK (CSVCerts nil)")
	}
}
