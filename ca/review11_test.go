package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
)

// Review 11: the AK issuer has its own CRL (/crl/ak, gRPC CRL "ak") and
// the verifier looks every AK certificate up in it, but AKCertify never
// records the AK certificate in the store. `cvtpm ca revoke` of an AK
// serial answers "unknown serial", and the AK CRL can never list anything:
// an AK certificate (one year) cannot be revoked at all.
func TestReview11AKCertificateRevocable(t *testing.T) {
	f := newFixture(t, true)
	st, err := OpenBoltStore(t.TempDir() + "/ca.db")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	f.auth.Store = st
	ctx := context.Background()

	// An AK challenge as AKChallenge leaves it (the TPM part is not what
	// is under test), answered correctly.
	ak, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	secret := []byte("activated secret 0123456789abcde")
	f.auth.tables()
	if err := f.auth.pendingAKs.Put("c1", "", pendingAK{secret: secret, ak: &attest.AKPublic{Public: ak.Public()},
		instance: "vm-1", ekDigest: sha256.Sum256([]byte("ek cert"))}); err != nil {
		t.Fatal(err)
	}
	cert, err := f.auth.AKCertify(ctx, "c1", secret)
	if err != nil {
		t.Fatal(err)
	}
	serial := cert.SerialNumber.Text(16)
	if err := f.auth.Revoke(ctx, serial, 1); err != nil {
		t.Fatalf("revoking AK certificate %s: %v (AKCertify did not record it in the store)", serial, err)
	}
	der, err := f.auth.CRL(ctx, PurposeAK, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range crl.RevokedCertificateEntries {
		if e.SerialNumber.Cmp(cert.SerialNumber) == 0 {
			return
		}
	}
	t.Fatalf("the AK CRL does not list the revoked AK certificate %s", serial)
}
