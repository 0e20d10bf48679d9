package ca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func testRoot(t testing.TB) (*x509.Certificate, crypto.Signer) {
	return testRootNamed(t, "cvtpm test EK CA")
}

// testIssuer is a fresh root for one purpose.
func testIssuer(t testing.TB, p Purpose) *Issuer {
	c, k := testRootNamed(t, "cvtpm test "+string(p)+" CA")
	return &Issuer{Cert: c, Signer: k}
}

func testRootNamed(t testing.TB, name string) (*x509.Certificate, crypto.Signer) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		SubjectKeyId:          []byte{1, 2, 3, 4, 5, 6, 7, 8},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	root, _ := x509.ParseCertificate(der)
	return root, key
}

func writePEM(t *testing.T, path string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestIssueEKCertificate issues RSA and ECC EK certificates and checks them
// the way a relying party would: openssl verifies the chain and shows the
// TCG profile's fields; the claims extension round-trips.
func TestIssueEKCertificate(t *testing.T) {
	openssl, err := exec.LookPath("openssl")
	if err != nil {
		t.Fatal("openssl is not installed: run 'make deps'")
	}
	root, signer := testRoot(t)
	dir := t.TempDir()
	writePEM(t, filepath.Join(dir, "root.pem"), root.Raw)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	eccKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	claims := &CSVClaims{
		Measurement: bytes.Repeat([]byte{0x11}, 32), Policy: 0x40000001,
		ChipIDDigest: bytes.Repeat([]byte{0x22}, 32), RootFingerprint: "sm3:abcd",
		ReportDigest: bytes.Repeat([]byte{0x33}, 32), Simulated: true,
	}
	tpm := TPMInfo{Manufacturer: "id:49424D00", Model: "cvtpm", Version: "id:20240125", SpecLevel: 0, SpecRevision: 164}
	for _, tc := range []struct {
		name     string
		ek       crypto.PublicKey
		keyUsage string
	}{
		{"rsa", &rsaKey.PublicKey, "Key Encipherment"},
		{"ecc", &eccKey.PublicKey, "Key Agreement"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert, err := IssueEKCertificate(EKCertificateRequest{EK: tc.ek, TPM: tpm, Claims: claims}, root, signer)
			if err != nil {
				t.Fatal(err)
			}
			ekPEM := filepath.Join(dir, tc.name+".pem")
			writePEM(t, ekPEM, cert.Raw)
			if out, err := exec.Command(openssl, "verify", "-CAfile", filepath.Join(dir, "root.pem"), ekPEM).CombinedOutput(); err != nil {
				t.Fatalf("openssl verify: %v\n%s", err, out)
			}
			text, err := exec.Command(openssl, "x509", "-in", ekPEM, "-noout", "-text").CombinedOutput()
			if err != nil {
				t.Fatalf("openssl x509: %v\n%s", err, text)
			}
			for _, want := range []string{
				"2.23.133.8.1",
				"X509v3 Subject Alternative Name: critical",
				"DirName:/2.23.133.2.1=id:49424D00/2.23.133.2.2=cvtpm/2.23.133.2.3=id:20240125",
				"X509v3 Basic Constraints: critical",
				"CA:FALSE",
				"X509v3 Subject Directory Attributes",
				"X509v3 Authority Key Identifier",
				"X509v3 Key Usage: critical",
				tc.keyUsage,
				"2.999.7.1:", // the claims extension, non-critical
			} {
				if !strings.Contains(string(text), want) {
					t.Errorf("openssl shows no %q in\n%s", want, text)
				}
			}
			if strings.Contains(string(text), "TLS Web") {
				t.Errorf("the EK certificate allows TLS use:\n%s", text)
			}
			if cert.Subject.String() != "" {
				t.Errorf("subject %q, want empty (the TPM is named in the SAN)", cert.Subject)
			}
			var got *CSVClaims
			for _, e := range cert.Extensions {
				if e.Id.Equal(OIDCVTPMCSVClaims) {
					if e.Critical {
						t.Errorf("claims extension is critical")
					}
					c, err := ParseCSVClaims(e.Value)
					if err != nil {
						t.Fatal(err)
					}
					got = &c
				}
			}
			if got == nil || !bytes.Equal(got.Measurement, claims.Measurement) || got.Policy != claims.Policy ||
				got.RootFingerprint != claims.RootFingerprint || !got.Simulated {
				t.Fatalf("claims round trip: %+v", got)
			}
		})
	}
}

func TestIssueEKCertificateRefusals(t *testing.T) {
	root, signer := testRoot(t)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	cases := []struct {
		name string
		req  EKCertificateRequest
		want string
	}{
		{"no TPM info", EKCertificateRequest{EK: &rsaKey.PublicKey}, "manufacturer, model and version"},
		{"ed25519-like key", EKCertificateRequest{EK: []byte("not a key"), TPM: TPMInfo{"a", "b", "c", "", 0, 0}}, "RSA or ECDSA"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := IssueEKCertificate(tc.req, root, signer)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
	if _, err := ParseCSVClaims([]byte{0x30, 0x03, 0x02, 0x01}); err == nil {
		t.Fatal("ParseCSVClaims accepted truncated DER")
	}
}

// FuzzParseCSVClaims: the claims extension comes from certificates others
// made; its parser must never panic and must round-trip what it accepts.
func FuzzParseCSVClaims(f *testing.F) {
	seed, _ := MarshalCSVClaims(CSVClaims{Measurement: []byte{1}, Policy: 3, RootFingerprint: "r"})
	f.Add(seed)
	f.Add([]byte{0x30, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCSVClaims(b)
		if err != nil {
			return
		}
		if _, err := MarshalCSVClaims(c); err != nil {
			t.Fatalf("accepted claims do not re-encode: %v", err)
		}
	})
}
