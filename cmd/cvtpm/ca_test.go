package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"log/slog"
	"net"
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
			keys, err := loadOrCreateCARoots(dir, kt, log)
			if err != nil {
				t.Fatal(err)
			}
			again, err := loadOrCreateCARoots(dir, "p256", log) // type only matters on creation
			if err != nil {
				t.Fatal(err)
			}
			all := []*ca.Issuer{keys.ek, keys.ak, keys.identity, keys.service}
			for i, is := range []*ca.Issuer{again.ek, again.ak, again.identity, again.service} {
				if !bytes.Equal(is.DER(), all[i].DER()) {
					t.Fatalf("reload gave another root %d", i)
				}
			}
			audit, err := ca.OpenAuditFile(filepath.Join(dir, "audit.jsonl"))
			if err != nil {
				t.Fatal(err)
			}
			defer audit.Close()
			a := &ca.Authority{EKIssuer: keys.ek, AKIssuer: keys.ak, IdentityIssuer: keys.identity, Audit: audit}
			cert, err := a.IssueIdentity(context.Background(), csr, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			if err := pkisig.SignedBy(cert.Raw, keys.identity.DER()); err != nil {
				t.Fatalf("identity does not verify under the identity root: %v", err)
			}
			// Neither this CA's other roots nor another CA's root accept it.
			for _, other := range append(roots, keys.ek.DER(), keys.ak.DER(), keys.service.DER()) {
				if pkisig.SignedBy(cert.Raw, other) == nil {
					t.Fatal("identity certificate verifies under another root")
				}
			}
			roots = append(roots, keys.identity.DER())
			// The TLS port: a handshake pinned to the service root
			// succeeds (an SM2 root signs a P-256 TLS key); pinned to
			// another root it fails.
			srv, err := ca.ServerTLS(keys.service, []string{"127.0.0.1"}, time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			for _, pin := range []struct {
				root []byte
				ok   bool
			}{{keys.service.DER(), true}, {keys.identity.DER(), false}} {
				fp, _ := ca.ParseFingerprint(ca.Fingerprint(pin.root))
				c, s := net.Pipe()
				go tls.Server(s, srv).Handshake()
				err := tls.Client(c, ca.ClientTLS(fp)).Handshake()
				c.Close()
				s.Close()
				if (err == nil) != pin.ok {
					t.Fatalf("TLS pinned to root ok=%v: %v", pin.ok, err)
				}
			}
		})
	}
	if _, err := loadOrCreateCARoots(t.TempDir(), "dsa", log); err == nil || !strings.Contains(err.Error(), "--key-type") {
		t.Fatalf("unknown key type: %v", err)
	}
}
