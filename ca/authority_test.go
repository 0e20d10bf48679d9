package ca

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/enroll"
)

// ekArea returns the TPMT_PUBLIC of a fresh ECC P-256 EK (the TCG template
// with a real point).
func ekArea(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pub := tpm2.ECCEKTemplate
	x, y := k.PublicKey.X.FillBytes(make([]byte, 32)), k.PublicKey.Y.FillBytes(make([]byte, 32))
	pub.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: x}, Y: tpm2.TPM2BECCParameter{Buffer: y}})
	return tpm2.Marshal(pub)
}

type caFixture struct {
	auth      *Authority
	sim       *csv.Simulator
	auditPath string
	clock     time.Time
}

var goodMeasure = [32]byte{0x11, 0x78, 0xda}

func newFixture(t testing.TB, trustSim bool) *caFixture {
	t.Helper()
	sim, err := csv.NewSimulator("SIMCHIP0042")
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.SetVM(csv.VMConfig{Version: 1, Measure: goodMeasure, Policy: 0x7}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := &Policy{AppraisalPolicy: csv.AppraisalPolicy{ApprovedMeasurements: []string{hex.EncodeToString(goodMeasure[:])}}}
	if trustSim {
		rootFile := filepath.Join(dir, "sim-hrk.cert")
		os.WriteFile(rootFile, sim.HRK.Marshal(), 0o600)
		p.SimulatorRoots = []string{rootFile}
	}
	if err := p.compile(); err != nil {
		t.Fatal(err)
	}
	f := &caFixture{sim: sim, auditPath: filepath.Join(dir, "audit.jsonl"), clock: time.Now()}
	audit, err := OpenAuditFile(f.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { audit.Close() })
	f.auth = &Authority{
		Policy:   p,
		Verifier: csv.NewVerifier(csv.VerifierOptions{TrustedRoots: p.TrustedRoots(), Certs: csv.StaticSource{HSK: sim.HSK, CEK: sim.CEK}}),
		EKIssuer: testIssuer(t, PurposeEK), AKIssuer: testIssuer(t, PurposeAK), IdentityIssuer: testIssuer(t, PurposeIdentity),
		TPM:   TPMInfo{Manufacturer: "id:49424D00", Model: "cvtpm", Version: "id:1", SpecRevision: 164},
		Audit: audit,
		Now:   func() time.Time { return f.clock },
	}
	return f
}

// request makes an enrollment whose report commits to (nonce, ek, bindTo).
func (f *caFixture) request(t testing.TB, instance string, ek, nonce []byte, bindTo string) enroll.Request {
	t.Helper()
	rd := enroll.ReportData(nonce, ek, bindTo)
	report, err := f.sim.Report(context.Background(), rd[:])
	if err != nil {
		t.Fatal(err)
	}
	return enroll.Request{InstanceID: instance, EKPublicArea: ek, Nonce: nonce, Report: report}
}

func (f *caFixture) challenge(t testing.TB) []byte {
	n, err := f.auth.Challenge(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestEnrollRefusals: each way an enrollment can be wrong is refused with
// its reason in the error and in the audit log, and nothing is issued.
func TestEnrollRefusals(t *testing.T) {
	ctx := context.Background()
	cases := []struct {
		name     string
		trustSim bool
		run      func(t *testing.T, f *caFixture) (enroll.Request, error)
		reason   string
	}{
		{"wrong root", false, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			ek := ekArea(t)
			r := f.request(t, "vm-1", ek, f.challenge(t), "vm-1")
			return r, nil
		}, ReasonUntrustedRoot},
		{"debug policy", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			f.sim.SetVM(csv.VMConfig{Version: 1, Measure: goodMeasure, Policy: 0x6})
			ek := ekArea(t)
			return f.request(t, "vm-1", ek, f.challenge(t), "vm-1"), nil
		}, ReasonDebug},
		{"unapproved measurement", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			f.sim.SetVM(csv.VMConfig{Version: 1, Measure: [32]byte{9}, Policy: 0x7})
			ek := ekArea(t)
			return f.request(t, "vm-1", ek, f.challenge(t), "vm-1"), nil
		}, ReasonMeasurement},
		{"unknown nonce", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			ek := ekArea(t)
			return f.request(t, "vm-1", ek, bytes.Repeat([]byte{7}, 32), "vm-1"), nil
		}, ReasonNonce},
		{"expired nonce", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			ek := ekArea(t)
			r := f.request(t, "vm-1", ek, f.challenge(t), "vm-1")
			f.clock = f.clock.Add(10 * time.Minute)
			return r, nil
		}, ReasonNonceExpired},
		{"replayed request", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			ek := ekArea(t)
			r := f.request(t, "vm-1", ek, f.challenge(t), "vm-1")
			if _, err := f.auth.Enroll(ctx, r); err != nil {
				t.Fatalf("first enrollment: %v", err)
			}
			return r, nil
		}, ReasonNonce},
		{"report for another EK", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			n := f.challenge(t)
			r := f.request(t, "vm-1", ekArea(t), n, "vm-1")
			r.EKPublicArea = ekArea(t)
			return r, nil
		}, ReasonReportData},
		{"evidence from another instance", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			ek := ekArea(t)
			return f.request(t, "vm-1", ek, f.challenge(t), "vm-2"), nil
		}, ReasonReportData},
		{"re-enrollment with another EK", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			if _, err := f.auth.Enroll(ctx, f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1")); err != nil {
				t.Fatalf("first enrollment: %v", err)
			}
			return f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1"), nil
		}, ReasonReenroll},
		{"tampered report", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			r := f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1")
			r.Report[150] ^= 1 // inside the signed measure
			return r, nil
		}, ReasonEvidence},
		{"garbage EK", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			r := f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1")
			r.EKPublicArea = []byte{1, 2, 3}
			return r, nil
		}, ReasonBadRequest},
		{"a software signing key presented as the EK", true, func(t *testing.T, f *caFixture) (enroll.Request, error) {
			pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](ekArea(t))
			if err != nil {
				t.Fatal(err)
			}
			pub.ObjectAttributes.FixedTPM, pub.ObjectAttributes.Decrypt, pub.ObjectAttributes.SignEncrypt = false, false, true
			area := tpm2.Marshal(*pub)
			// The CSV report binds this public area, as a genuine one would.
			return f.request(t, "vm-1", area, f.challenge(t), "vm-1"), nil
		}, ReasonBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, tc.trustSim)
			req, _ := tc.run(t, f)
			cert, err := f.auth.Enroll(ctx, req)
			var r *Refusal
			if !errors.As(err, &r) || r.Reason != tc.reason {
				t.Fatalf("Enroll = %v, want refusal %q", err, tc.reason)
			}
			if cert != nil {
				t.Fatalf("a refused enrollment issued a certificate")
			}
			log, err := ReadAudit(f.auditPath)
			if err != nil {
				t.Fatal(err)
			}
			last := log[len(log)-1]
			if last.Decision != "refused" || last.Reason != tc.reason || last.InstanceID != "vm-1" {
				t.Fatalf("audit entry %+v", last)
			}
		})
	}
}

func TestEnrollIssues(t *testing.T) {
	f := newFixture(t, true)
	ek := ekArea(t)
	cert, err := f.auth.Enroll(context.Background(), f.request(t, "vm-1", ek, f.challenge(t), "vm-1"))
	if err != nil {
		t.Fatal(err)
	}
	var claims *CSVClaims
	for _, e := range cert.Extensions {
		if e.Id.Equal(OIDCVTPMCSVClaims) {
			c, err := ParseCSVClaims(e.Value)
			if err != nil {
				t.Fatal(err)
			}
			claims = &c
		}
	}
	if claims == nil || !bytes.Equal(claims.Measurement, goodMeasure[:]) || !claims.Simulated || claims.Policy != 0x7 {
		t.Fatalf("claims in the certificate: %+v", claims)
	}
	// Re-enrolling the same EK is allowed under the default rule.
	if _, err := f.auth.Enroll(context.Background(), f.request(t, "vm-1", ek, f.challenge(t), "vm-1")); err != nil {
		t.Fatalf("re-enrollment with the same EK: %v", err)
	}
	log, _ := ReadAudit(f.auditPath)
	if len(log) != 2 || log[0].Decision != "issued" || log[0].Serial == "" || log[0].ChipSerial != "SIMCHIP0042" {
		t.Fatalf("audit log %+v", log)
	}
}

func TestLoadPolicy(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "p.json")
		os.WriteFile(p, []byte(s), 0o600)
		return p
	}
	for _, tc := range []struct{ json, wantErr string }{
		{`{"approved_measurements":["` + hex.EncodeToString(goodMeasure[:]) + `"],"min_api":"1.2","reenroll":"never"}`, ""},
		{`{"approved_measurements":["abcd"]}`, "want 64 hex digits"},
		{`{"reenroll":"sometimes"}`, "reenroll"},
		{`{"min_api":"new"}`, "min_api"},
		{`{"aprooved_measurements":[]}`, "unknown field"},
		{`{"simulator_roots":["/nonexistent"]}`, "simulator root"},
	} {
		_, err := LoadPolicy(write(tc.json))
		if (err == nil) != (tc.wantErr == "") || (err != nil && !bytes.Contains([]byte(err.Error()), []byte(tc.wantErr))) {
			t.Errorf("LoadPolicy(%s) = %v, want %q", tc.json, err, tc.wantErr)
		}
	}
}

// TestRevocationSurvivesRestart: a revoked EK certificate is on the CRL,
// openssl verifies the CRL against the CA root, and reopening the database
// and the audit log (a CA restart) keeps issued, revoked and audit records.
func TestRevocationSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, true)
	dbPath := filepath.Join(t.TempDir(), "ca.db")
	st, err := OpenBoltStore(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	f.auth.Store = st
	cert, err := f.auth.Enroll(ctx, f.request(t, "vm-1", ekArea(t), f.challenge(t), "vm-1"))
	if err != nil {
		t.Fatal(err)
	}
	serial := cert.SerialNumber.Text(16)
	if err := f.auth.Revoke(ctx, serial, 1); err != nil { // keyCompromise
		t.Fatal(err)
	}
	if err := f.auth.Revoke(ctx, "abcdef", 1); !errors.Is(err, ErrUnknownSerial) {
		t.Fatalf("revoking an unknown serial: %v", err)
	}
	// Only reasons RFC 5280 defines are published.
	for _, r := range []int{-1, 7, 11, 99} {
		if err := f.auth.Revoke(ctx, serial, r); !errors.Is(err, ErrBadReason) {
			t.Errorf("revoking with reason %d: %v", r, err)
		}
	}
	st.Close()

	st, err = OpenBoltStore(dbPath) // restart
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rec, err := st.Issued(ctx, serial)
	if err != nil || rec.InstanceID != "vm-1" || rec.Revoked.IsZero() {
		t.Fatalf("after restart: %+v, %v", rec, err)
	}
	f.auth.Store = st
	der, err := f.auth.CRL(ctx, PurposeEK, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	crl, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	if len(crl.RevokedCertificateEntries) != 1 || crl.RevokedCertificateEntries[0].SerialNumber.Cmp(cert.SerialNumber) != 0 {
		t.Fatalf("CRL entries %+v", crl.RevokedCertificateEntries)
	}
	dir := t.TempDir()
	writePEM(t, filepath.Join(dir, "root.pem"), f.auth.EKIssuer.DER())
	os.WriteFile(filepath.Join(dir, "crl.pem"), pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o600)
	out, err := exec.Command("openssl", "crl", "-CAfile", filepath.Join(dir, "root.pem"), "-in", filepath.Join(dir, "crl.pem"), "-noout").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "verify OK") {
		t.Fatalf("openssl crl: %v\n%s", err, out)
	}
	log, _ := ReadAudit(f.auditPath)
	if last := log[len(log)-1]; last.Decision != "revoked" || last.Serial != serial {
		t.Fatalf("audit after restart: %+v", last)
	}
}
