package pkisig

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/emmansun/gmsm/sm2"
	"github.com/emmansun/gmsm/smx509"
)

func pairs(t testing.TB) (ecRoot, ecLeaf, smRoot, smLeaf []byte) {
	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ec root"}, NotBefore: now, NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	ecRoot, _ = x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	caCert, _ := x509.ParseCertificate(ecRoot)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "leaf"}, NotBefore: now, NotAfter: now.Add(time.Hour)}
	ecLeaf, _ = x509.CreateCertificate(rand.Reader, leaf, caCert, &leafKey.PublicKey, caKey)

	smKey, _ := sm2.GenerateKey(rand.Reader)
	sca := &smx509.Certificate{SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "sm2 root"}, NotBefore: now, NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: smx509.KeyUsageCertSign}
	var err error
	if smRoot, err = smx509.CreateCertificate(rand.Reader, sca, sca, smKey.Public(), smKey); err != nil {
		t.Fatal(err)
	}
	smCA, _ := smx509.ParseCertificate(smRoot)
	sleaf := &smx509.Certificate{SerialNumber: big.NewInt(4), Subject: pkix.Name{CommonName: "leaf"}, NotBefore: now, NotAfter: now.Add(time.Hour)}
	if smLeaf, err = smx509.CreateCertificate(rand.Reader, sleaf, smCA, &leafKey.PublicKey, smKey); err != nil {
		t.Fatal(err)
	}
	return
}

func TestSignedBy(t *testing.T) {
	ecRoot, ecLeaf, smRoot, smLeaf := pairs(t)
	for _, tc := range []struct {
		name         string
		cert, issuer []byte
		ok           bool
	}{
		{"ecdsa", ecLeaf, ecRoot, true},
		{"sm2", smLeaf, smRoot, true},
		{"ecdsa leaf, sm2 root", ecLeaf, smRoot, false},
		{"sm2 leaf, ecdsa root", smLeaf, ecRoot, false},
		{"garbage issuer", ecLeaf, []byte{0x30, 0x00}, false},
		{"garbage cert", []byte("x"), smRoot, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := SignedBy(tc.cert, tc.issuer); (err == nil) != tc.ok {
				t.Fatalf("SignedBy = %v, want ok=%v", err, tc.ok)
			}
		})
	}
	flipped := append([]byte(nil), smLeaf...)
	flipped[len(flipped)-3] ^= 1
	if SignedBy(flipped, smRoot) == nil {
		t.Fatal("a flipped signature verified")
	}
}

func FuzzSignedBy(f *testing.F) {
	ecRoot, ecLeaf, smRoot, smLeaf := pairs(f)
	f.Add(ecLeaf, ecRoot)
	f.Add(smLeaf, smRoot)
	f.Fuzz(func(t *testing.T, cert, issuer []byte) {
		SignedBy(cert, issuer)
	})
}
