package backend

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cvtpm/internal/attestedlink"
	"cvtpm/internal/pkisig"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T, name string) testCA {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return testCA{cert, key}
}

func (ca testCA) issue(t *testing.T, cn string, serial int64) *x509.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

func (ca testCA) crl(t *testing.T, next time.Time, revoked ...int64) []byte {
	var entries []x509.RevocationListEntry
	for _, s := range revoked {
		entries = append(entries, x509.RevocationListEntry{SerialNumber: big.NewInt(s), RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{Number: big.NewInt(time.Now().UnixNano()),
		ThisUpdate: next.Add(-2 * time.Hour), NextUpdate: next, RevokedCertificateEntries: entries}, ca.cert, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// A revoked link identity is refused by the backend on its next call; so
// is every client while the CA's CRL is unavailable, stale or not the
// client CA's (fail closed).
func TestClientRevocation(t *testing.T) {
	ca, other := newTestCA(t, "link CA"), newTestCA(t, "another CA")
	guest, frontend := ca.issue(t, "guest-vm1", 10), ca.issue(t, "frontend", 11)
	var mu sync.Mutex
	current := ca.crl(t, time.Now().Add(time.Hour))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if current == nil {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Write(current)
	}))
	defer srv.Close()
	set := func(b []byte) {
		mu.Lock()
		current = b
		mu.Unlock()
	}
	aclFile := filepath.Join(t.TempDir(), "acl.json")
	os.WriteFile(aclFile, []byte(`{"clients": {"frontend": {"instances": ["*"], "capabilities": ["host"]}, "guest-vm1": {"instances": ["vm1"], "capabilities": ["guest"]}}}`), 0o600)
	acl, err := LoadACL(aclFile)
	if err != nil {
		t.Fatal(err)
	}
	// No cache, so every change of the served CRL shows at once.
	access := &Access{ACL: acl, Bindings: bindingsMap{}, Revocation: &ClientRevocation{Issuers: []*x509.Certificate{ca.cert},
		CRL: pkisig.HTTPCRL{URL: srv.URL}}}
	try := func(c *x509.Certificate) error {
		_, err := access.Authorize(context.Background(), &attestedlink.Peer{Certificate: c}, "vm1")
		return err
	}
	if err := try(guest); err != nil {
		t.Fatalf("unrevoked identity: %v", err)
	}
	for _, tc := range []struct {
		name string
		crl  []byte
		who  *x509.Certificate
		want string
	}{
		{"revoked identity", ca.crl(t, time.Now().Add(time.Hour), 10), guest, `"guest-vm1" (serial a) was revoked`},
		{"stale CRL (a replayed old one)", ca.crl(t, time.Now().Add(-time.Minute)), frontend, "stale"},
		{"CRL from another CA", other.crl(t, time.Now().Add(time.Hour)), frontend, "is not the CRL of"},
		{"CRL unavailable", nil, frontend, "unavailable"},
	} {
		set(tc.crl)
		if err := try(tc.who); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	set(ca.crl(t, time.Now().Add(time.Hour), 10))
	if err := try(frontend); err != nil {
		t.Errorf("an unrevoked identity with a fresh CRL: %v", err)
	}
}
