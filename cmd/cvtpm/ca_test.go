package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"log/slog"
	"strings"
	"testing"

	"cvtpm/ca"
)

// TestCAKeyTypes: each CA key type is created once, reloaded unchanged,
// and signs EK certificates that verify under the root.
func TestCAKeyTypes(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	ek, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, kt := range []string{"p256", "p384", "rsa3072"} {
		t.Run(kt, func(t *testing.T) {
			dir := t.TempDir()
			root, signer, err := loadOrCreateCAKey(dir, kt, log)
			if err != nil {
				t.Fatal(err)
			}
			again, signer2, err := loadOrCreateCAKey(dir, "p256", log) // type only matters on creation
			if err != nil || !again.Equal(root) || !signer2.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(signer.Public()) {
				t.Fatalf("reload gave another CA: %v", err)
			}
			cert, err := ca.IssueEKCertificate(ca.EKCertificateRequest{EK: &ek.PublicKey,
				TPM: ca.TPMInfo{Manufacturer: "id:1", Model: "m", Version: "v"}}, root, signer)
			if err != nil {
				t.Fatal(err)
			}
			if err := cert.CheckSignatureFrom(root); err != nil {
				t.Fatal(err)
			}
		})
	}
	if _, _, err := loadOrCreateCAKey(t.TempDir(), "dsa", log); err == nil || !strings.Contains(err.Error(), "--key-type") {
		t.Fatalf("unknown key type: %v", err)
	}
}
