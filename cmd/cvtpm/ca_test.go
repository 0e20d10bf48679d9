package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cvtpm/ca"
	"cvtpm/internal/pkisig"
)

// TestCAKeyTypes: each CA key type is created once, reloaded unchanged,
// and signs certificates that verify under the root (SM2 through gmsm).
func TestCAKeyTypes(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	leaf, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csrDER, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: "guest-1"}}, leaf)
	csr, _ := x509.ParseCertificateRequest(csrDER)
	var roots [][]byte
	for _, kt := range []string{"p256", "p384", "rsa3072", "sm2"} {
		t.Run(kt, func(t *testing.T) {
			dir := t.TempDir()
			keys, err := loadOrCreateCAKey(dir, kt, log)
			if err != nil {
				t.Fatal(err)
			}
			again, err := loadOrCreateCAKey(dir, "p256", log) // type only matters on creation
			if err != nil || !bytes.Equal(rootDER(again), rootDER(keys)) {
				t.Fatalf("reload gave another CA: %v", err)
			}
			audit, err := ca.OpenAuditFile(filepath.Join(dir, "audit.jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			defer audit.Close()
			a := &ca.Authority{Issuer: keys.issuer, Signer: keys.signer, SM2: keys.sm2, Audit: audit}
			cert, err := a.IssueIdentity(context.Background(), csr, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if err := pkisig.SignedBy(cert.Raw, rootDER(keys)); err != nil {
				t.Fatalf("certificate does not verify under its root: %v", err)
			}
			for _, other := range roots {
				if pkisig.SignedBy(cert.Raw, other) == nil {
					t.Fatal("certificate verifies under another CA's root")
				}
			}
			roots = append(roots, rootDER(keys))
		})
	}
	if _, err := loadOrCreateCAKey(t.TempDir(), "dsa", log); err == nil || !strings.Contains(err.Error(), "--key-type") {
		t.Fatalf("unknown key type: %v", err)
	}
}

func rootDER(k caKeys) []byte {
	if k.sm2 != nil {
		return k.sm2.Cert.Raw
	}
	return k.issuer.Raw
}
