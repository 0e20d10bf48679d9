package test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/enroll"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// TestEnrollIntoCvtpm enrolls a running cvtpm's EKs with the CA (in
// process, simulated CSV evidence) and checks the result the way the issue
// asks: tpm2_nvread gives certificates openssl verifies against the CA
// root, their keys are what tpm2_createek derives, openssl shows the TCG
// profile and the claims extension, and a second run changes nothing.
func TestEnrollIntoCvtpm(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	conn, err := tpmsock.Dial(ctx, "unix", srv.DataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	sim, err := csv.NewSimulator("SIMCHIP0007")
	if err != nil {
		t.Fatal(err)
	}
	measure := [32]byte{0xc5, 0x7a}
	sim.SetVM(csv.VMConfig{Version: 1, Measure: measure, Policy: 0x7})
	os.WriteFile(filepath.Join(dir, "sim-hrk.cert"), sim.HRK.Marshal(), 0o600)
	policyFile := filepath.Join(dir, "policy.json")
	os.WriteFile(policyFile, []byte(`{"simulator_roots":["`+filepath.Join(dir, "sim-hrk.cert")+`"],
		"approved_measurements":["`+hex.EncodeToString(measure[:])+`"]}`), 0o600)
	policy, err := ca.LoadPolicy(policyFile)
	if err != nil {
		t.Fatal(err)
	}
	root, signer := caRoot(t, filepath.Join(dir, "root.pem"), "cvtpm e2e EK CA")
	akRoot, akSigner := caRoot(t, filepath.Join(dir, "ak-root.pem"), "cvtpm e2e AK CA")
	audit, err := ca.OpenAuditFile(filepath.Join(dir, "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer audit.Close()
	authority := &ca.Authority{
		Policy:   policy,
		Verifier: csv.NewVerifier(csv.VerifierOptions{TrustedRoots: policy.TrustedRoots(), Certs: csv.StaticSource{HSK: sim.HSK, CEK: sim.CEK}}),
		EKIssuer: &ca.Issuer{Cert: root, Signer: signer}, AKIssuer: &ca.Issuer{Cert: akRoot, Signer: akSigner},
		TPM:   ca.TPMInfo{Manufacturer: "id:49424D00", Model: "cvtpm", Version: "id:1", SpecRevision: 164},
		Audit: audit,
	}
	client := &enroll.Client{TPM: conn, CA: authority, Evidence: sim, InstanceID: "vm-test-1"}
	// An instance enrolled by an earlier cvtpm has its ECC EK at
	// 0x8101000a; the next enrollment moves it to 0x81010002 and keeps
	// its certificate.
	legacy, err := client.Enroll(ctx, []enroll.EKSlot{{Name: "ECC P-256", Template: tpm2.ECCEKTemplate, Persistent: 0x8101000a, CertIndex: 0x01c0000a}})
	if err != nil {
		t.Fatal(err)
	}
	results, err := client.Enroll(ctx, enroll.DefaultSlots)
	if err != nil {
		t.Fatal(err)
	}
	if !results[1].Unchanged || results[1].Certificate.SerialNumber.Cmp(legacy[0].Certificate.SerialNumber) != 0 {
		t.Errorf("moving the ECC EK changed its certificate")
	}
	if h := strings.ToLower(testenv.Run(t, []string{"TPM2TOOLS_TCTI=" + srv.TCTI()}, "tpm2_getcap", "handles-persistent")); strings.Contains(h, "0x8101000a") {
		t.Errorf("the ECC EK is still at its former handle: %s", h)
	}

	tt := tools{tb: t, tcti: srv.TCTI(), dir: dir}
	for _, c := range []struct {
		index, alg, usage string
	}{{"0x01c00002", "rsa", "Key Encipherment"}, {"0x01c0000a", "ecc", "Key Agreement"}} {
		der := tt.path(c.alg + ".der")
		tt.run("tpm2_nvread", c.index, "-C", "o", "-o", der)
		pemFile := tt.path(c.alg + ".pem")
		testenv.Run(t, nil, "openssl", "x509", "-inform", "DER", "-in", der, "-out", pemFile)
		if out := testenv.Run(t, nil, "openssl", "verify", "-CAfile", filepath.Join(dir, "root.pem"), pemFile); !strings.Contains(out, ": OK") {
			t.Fatalf("openssl verify: %s", out)
		}
		text := testenv.Run(t, nil, "openssl", "x509", "-in", pemFile, "-noout", "-text")
		for _, want := range []string{"2.23.133.8.1", "X509v3 Subject Alternative Name: critical", "2.23.133.2.1=id:49424D00", c.usage, "2.999.7.1:"} {
			if !strings.Contains(text, want) {
				t.Errorf("%s certificate: openssl shows no %q", c.alg, want)
			}
		}
		// The certified key is the EK tpm2_createek derives.
		tt.run("tpm2_createek", "-G", c.alg, "-c", tt.path(c.alg+".ctx"), "-u", tt.path(c.alg+"-ek.pem"), "-f", "pem")
		tt.run("tpm2_flushcontext", "-t")
		ekPEM, _ := os.ReadFile(tt.path(c.alg + "-ek.pem"))
		certKey := testenv.Run(t, nil, "openssl", "x509", "-in", pemFile, "-noout", "-pubkey")
		if strings.TrimSpace(string(ekPEM)) != strings.TrimSpace(certKey) {
			t.Errorf("%s: certified key differs from tpm2_createek's\n%s\n%s", c.alg, certKey, ekPEM)
		}
	}
	if h := strings.ToLower(tt.run("tpm2_getcap", "handles-persistent")); !strings.Contains(h, "0x81010001") || !strings.Contains(h, "0x81010002") {
		t.Fatalf("EKs not persistent: %s", h)
	}

	// go-attestation finds the EKs and their certificates where it always
	// looks.
	checkGoAttestationEKs(t, srv.DataPath, results)

	// AK certification: an AK made by go-attestation on this TPM activates
	// the CA's credential for the certified RSA EK and gets a certificate
	// that chains to the CA root; a wrong answer is refused.
	certifyAK(t, srv.DataPath, authority, results[0].Certificate.Raw)

	// Idempotent: a second run finds the same EKs and their valid
	// certificates and asks the CA for nothing.
	issued, _ := ca.ReadAudit(filepath.Join(dir, "audit.jsonl"))
	again, err := client.Enroll(ctx, enroll.DefaultSlots)
	if err != nil {
		t.Fatalf("second enrollment: %v", err)
	}
	for i := range again {
		if !again[i].Unchanged || again[i].Certificate.SerialNumber.Cmp(results[i].Certificate.SerialNumber) != 0 {
			t.Errorf("%s: the second run changed the certificate", again[i].Slot.Name)
		}
	}
	if after, _ := ca.ReadAudit(filepath.Join(dir, "audit.jsonl")); len(after) != len(issued) {
		t.Errorf("the second run reached the CA: %d audit entries, then %d", len(issued), len(after))
	}
}

// caRoot makes a P-256 CA root named name and writes its PEM to path.
func caRoot(t *testing.T, path, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		SubjectKeyId: []byte{9, 8, 7, 6},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	root, _ := x509.ParseCertificate(der)
	return root, key
}

// socketChannel is go-attestation's command channel over a data socket.
type socketChannel struct{ net.Conn }

func (socketChannel) MeasurementLog() ([]byte, error) { return nil, nil }

func checkGoAttestationEKs(t *testing.T, path string, results []enroll.Result) {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: socketChannel{conn}})
	if err != nil {
		t.Fatalf("go-attestation OpenTPM: %v", err)
	}
	defer tpm.Close()
	// Both EKs sit at the TCG registry's handles (RSA 0x81010001, ECC
	// P-256 0x81010002): go-attestation's EKCertificates() matches each
	// certificate to its persistent key (its EKs() reports RSA EKs only).
	eks, err := tpm.EKCertificates()
	if err != nil {
		t.Fatalf("go-attestation EKCertificates: %v", err)
	}
	for _, want := range results {
		found := false
		for _, ek := range eks {
			if ek.Certificate != nil && ek.Certificate.SerialNumber.Cmp(want.Certificate.SerialNumber) == 0 &&
				ek.Public.(interface{ Equal(crypto.PublicKey) bool }).Equal(want.Certificate.PublicKey) {
				found = true
			}
		}
		if !found {
			t.Errorf("go-attestation's EKCertificates() does not report the %s EK with certificate %s (got %d EKs)", want.Slot.Name, want.Certificate.SerialNumber.Text(16), len(eks))
		}
	}
}

func certifyAK(t *testing.T, path string, authority *ca.Authority, ekCert []byte) {
	t.Helper()
	ctx := context.Background()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: socketChannel{conn}})
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	ak, err := tpm.NewAK(nil)
	if err != nil {
		t.Fatalf("go-attestation NewAK: %v", err)
	}
	defer ak.Close(tpm)
	params := ak.AttestationParameters()
	id, ec, err := authority.AKChallenge(ctx, ekCert, params)
	if err != nil {
		t.Fatalf("AKChallenge: %v", err)
	}
	secret, err := ak.ActivateCredential(tpm, *ec)
	if err != nil {
		t.Fatalf("ActivateCredential: %v", err)
	}
	wrongID, _, _ := authority.AKChallenge(ctx, ekCert, params)
	var r *ca.Refusal
	if _, err := authority.AKCertify(ctx, wrongID, append([]byte{1}, secret[1:]...)); !errors.As(err, &r) || r.Reason != ca.ReasonActivation {
		t.Fatalf("a wrong activation answer: %v", err)
	}
	cert, err := authority.AKCertify(ctx, id, secret)
	if err != nil {
		t.Fatalf("AKCertify: %v", err)
	}
	if err := cert.CheckSignatureFrom(authority.AKIssuer.Cert); err != nil {
		t.Fatalf("AK certificate does not chain to the AK root: %v", err)
	}
	if err := cert.CheckSignatureFrom(authority.EKIssuer.Cert); err == nil {
		t.Fatal("AK certificate chains to the EK root")
	}
	pub, err := attest.ParseAKPublic(params.Public)
	if err != nil {
		t.Fatal(err)
	}
	if !cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(pub.Public) {
		t.Fatalf("the AK certificate certifies another key")
	}
	if _, err := authority.AKCertify(ctx, id, secret); !errors.As(err, &r) || r.Reason != ca.ReasonNonce {
		t.Fatalf("answering a challenge twice: %v", err)
	}
}
