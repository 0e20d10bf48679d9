package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"cvtpm/internal/pkisig"
)

// The CA's gRPC port speaks TLS with a certificate from the CA's service
// root, a root that signs nothing but the CA service's own certificates
// (and the key broker's answers). Clients pin that root by its SHA-256
// fingerprint, as step-ca's bootstrap does: whoever relays the port can
// then neither read nor change the roots, CRLs and certificates a client
// receives.

// ServerTLS returns the server configuration of the CA's gRPC port (TLS
// 1.3 only): it presents a certificate for names (DNS names or IP
// addresses) from service, with the root, issued at start and issued
// anew once half its validity has passed, so a CA that runs for months
// keeps serving.
func ServerTLS(service *Issuer, names []string, validity time.Duration) (*tls.Config, error) {
	var mu sync.Mutex
	cur, err := serviceCertificate(service, names, validity)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			mu.Lock()
			defer mu.Unlock()
			if time.Now().After(cur.Leaf.NotBefore.Add(validity / 2)) {
				next, err := serviceCertificate(service, names, validity)
				if err != nil {
					return cur, nil // the current one is still valid
				}
				cur = next
			}
			return cur, nil
		},
	}, nil
}

func serviceCertificate(service *Issuer, names []string, validity time.Duration) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "cvtpm CA service"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(validity),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if n != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	cert, err := service.Sign(tmpl, key.Public())
	if err != nil {
		return nil, fmt.Errorf("signing the CA's TLS certificate: %w", err)
	}
	return &tls.Certificate{Certificate: [][]byte{cert.Raw, service.DER()}, PrivateKey: key, Leaf: cert}, nil
}

// Fingerprint is the SHA-256 of a root certificate (DER), in hex.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// ParseFingerprint reads a SHA-256 fingerprint: 64 hex digits, with or
// without colons and an optional "SHA256:" prefix (openssl's and
// step-ca's spellings).
func ParseFingerprint(s string) ([]byte, error) {
	t := strings.TrimPrefix(strings.TrimPrefix(strings.TrimSpace(s), "SHA256:"), "sha256:")
	t = strings.ReplaceAll(t, ":", "")
	b, err := hex.DecodeString(t)
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("fingerprint %q: want the SHA-256 of the CA's service root, 64 hex digits", s)
	}
	return b, nil
}

// ClientTLS is the configuration of a client that trusts only a CA whose
// service root has the SHA-256 fingerprint pin: the server must present
// that root and a current server certificate it signed. The host name is
// not checked: the pinned root certifies only this CA service.
func ClientTLS(pin []byte) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// The chain is checked below against the pin instead of the
		// system roots (which never certify a private CA).
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyPinned(raw, pin, time.Now())
		},
	}
}

// verifyPinned checks a presented chain (leaf first, root last) against
// the pinned root fingerprint.
func verifyPinned(raw [][]byte, pin []byte, now time.Time) error {
	if len(raw) < 2 {
		return errors.New("the CA presented no root: it is not a cvtpm CA (or not the pinned one)")
	}
	root := raw[len(raw)-1]
	sum := sha256.Sum256(root)
	if subtle.ConstantTimeCompare(sum[:], pin) != 1 {
		return fmt.Errorf("the CA's service root has fingerprint %x, not the pinned %x: refusing to talk to it", sum, pin)
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return fmt.Errorf("the CA's TLS certificate: %w", err)
	}
	if err := pkisig.SignedBy(leaf.Raw, root); err != nil {
		return fmt.Errorf("the CA's TLS certificate is not signed by the pinned root: %w", err)
	}
	if now.Before(leaf.NotBefore) || now.After(leaf.NotAfter) {
		return fmt.Errorf("the CA's TLS certificate is not valid now (%s to %s)", leaf.NotBefore.UTC().Format(time.RFC3339), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		return errors.New("the CA's TLS certificate is not for server authentication")
	}
	return nil
}
