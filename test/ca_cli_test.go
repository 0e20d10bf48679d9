package test

import (
	"encoding/pem"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/emmansun/gmsm/smx509"

	"cvtpm/ca"
	"cvtpm/internal/pkisig"
	"cvtpm/test/testenv"
)

// startCA runs `cvtpm ca` with the offline HSK+CEK directory certDir.
func startCA(t *testing.T, dir, policy, certDir string, extra ...string) *caProc {
	t.Helper()
	return startCAProc(t, dir, policy, append([]string{"--cert-dir", certDir}, extra...)...)
}

// TestCACommand drives `cvtpm ca`, `cvtpm enroll` and `cvtpm ca revoke` as
// an operator would: enrollment of a running cvtpm, a refusal with its
// reason in the API error and the audit log, revocation on the CRL that
// openssl verifies, and all of it kept across a CA restart.
func TestCACommand(t *testing.T) {
	dir := t.TempDir()
	bin := testenv.Binary(t, testenv.Cvtpm)
	measure := strings.Repeat("5e", 32)
	for _, chip := range []string{"SIMCHIP0001", "SIMCHIP0002"} {
		testenv.Run(t, nil, bin, "csv", "simulate", "--out", filepath.Join(dir, chip), "--chip", chip, "--measure", measure, "--policy", "0x7")
		os.MkdirAll(filepath.Join(dir, "kds", "hsk_cek", chip), 0o700)
		b, _ := os.ReadFile(filepath.Join(dir, chip, "hsk_cek.cert"))
		os.WriteFile(filepath.Join(dir, "kds", "hsk_cek", chip, "hsk_cek.cert"), b, 0o600)
	}
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{"simulator_roots":["`+filepath.Join(dir, "SIMCHIP0001", "hrk.cert")+`"],"approved_measurements":["`+measure+`"]}`), 0o600)
	caDir := filepath.Join(dir, "ca")
	c := startCA(t, caDir, policy, filepath.Join(dir, "kds"))

	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	out := testenv.Run(t, nil, bin, "enroll", "--tpm-socket", srv.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "SIMCHIP0001"))
	serial := regexp.MustCompile(`RSA-2048 +EK at 0x81010001: certificate serial ([0-9a-f]+)`).FindStringSubmatch(out)
	if serial == nil {
		t.Fatalf("cvtpm enroll printed no RSA certificate:\n%s", out)
	}

	// A chip whose root the policy does not list: refused, reason named.
	srv2 := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	refused, err := testenv.RunErr(nil, bin, "enroll", "--tpm-socket", srv2.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-b", "--csv-sim", filepath.Join(dir, "SIMCHIP0002"))
	if err == nil || !strings.Contains(refused, ca.ReasonUntrustedRoot) {
		t.Fatalf("enrollment on an untrusted chip: %v\n%s", err, refused)
	}

	testenv.Run(t, nil, bin, "ca", "revoke", "--dir", caDir, "--reason", "1", serial[1])
	c.Restart(t) // records must survive

	r, err := http.Get(c.CRLURL(ca.PurposeEK) + "?format=pem")
	if err != nil {
		t.Fatal(err)
	}
	crl, _ := io.ReadAll(r.Body)
	r.Body.Close()
	os.WriteFile(filepath.Join(dir, "crl.pem"), crl, 0o600)
	text := testenv.Run(t, nil, "openssl", "crl", "-CAfile", filepath.Join(caDir, "ca.pem"), "-in", filepath.Join(dir, "crl.pem"), "-noout", "-text")
	if !strings.Contains(strings.ToLower(strings.ReplaceAll(text, ":", "")), strings.TrimLeft(serial[1], "0")) {
		t.Fatalf("the CRL after a restart does not list %s:\n%s", serial[1], text)
	}
	log, err := ca.ReadAudit(filepath.Join(caDir, "audit.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var decisions []string
	for _, e := range log {
		decisions = append(decisions, e.Decision+":"+e.Reason)
	}
	want := []string{"issued:", "issued:", "refused:" + ca.ReasonUntrustedRoot, "revoked:crl-reason-1"}
	if strings.Join(decisions, " ") != strings.Join(want, " ") {
		t.Fatalf("audit log %v, want %v", decisions, want)
	}

	// The enroll client consults the CRL: the revoked RSA certificate is
	// replaced by a new one, the valid ECC certificate is kept.
	again := testenv.Run(t, nil, bin, "enroll", "--tpm-socket", srv.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "SIMCHIP0001"))
	newSerial := regexp.MustCompile(`RSA-2048 +EK at 0x81010001: certificate serial ([0-9a-f]+).* written`).FindStringSubmatch(again)
	if newSerial == nil || newSerial[1] == serial[1] || !strings.Contains(again, "0x01c0000a already there") {
		t.Fatalf("enrollment after revocation:\n%s", again)
	}
}

// `cvtpm ca identity`: a link identity issued over the admin socket that
// openssl verifies against the CA's identity root, for client and server
// auth, and not against its EK and AK roots.
func TestCAIdentity(t *testing.T) {
	dir := t.TempDir()
	bin := testenv.Binary(t, testenv.Cvtpm)
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{}`), 0o600)
	caDir := filepath.Join(dir, "ca")
	os.MkdirAll(filepath.Join(dir, "hsk_cek"), 0o700) // an empty offline HSK+CEK directory
	startCA(t, caDir, policy, dir)
	cert, key := filepath.Join(dir, "guest.pem"), filepath.Join(dir, "guest.key")
	testenv.Run(t, nil, bin, "ca", "identity", "--dir", caDir, "--name", "guest-vm7", "--out-cert", cert, "--out-key", key, "--validity", "24h")
	if out := testenv.Run(t, nil, "openssl", "verify", "-CAfile", filepath.Join(caDir, "identity-ca.pem"), cert); !strings.Contains(out, ": OK") {
		t.Fatalf("openssl verify: %s", out)
	}
	ekak, _ := os.ReadFile(filepath.Join(caDir, "ca.pem"))
	ak, _ := os.ReadFile(filepath.Join(caDir, "ak-ca.pem"))
	os.WriteFile(filepath.Join(dir, "ek-ak-roots.pem"), append(ekak, ak...), 0o600)
	if out, err := testenv.RunErr(nil, "openssl", "verify", "-CAfile", filepath.Join(dir, "ek-ak-roots.pem"), cert); err == nil || strings.Contains(out, ": OK") {
		t.Fatalf("openssl verify of an identity under the EK and AK roots passed: %s", out)
	}
	text := testenv.Run(t, nil, "openssl", "x509", "-in", cert, "-noout", "-text")
	for _, want := range []string{"CN = guest-vm7", "TLS Web Client Authentication", "TLS Web Server Authentication"} {
		if !strings.Contains(text, want) {
			t.Fatalf("certificate lacks %q:\n%s", want, text)
		}
	}
	if fi, err := os.Stat(key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode: %v %v", fi.Mode(), err)
	}
	// The audit log records the decision.
	audit, _ := os.ReadFile(filepath.Join(caDir, "audit.jsonl"))
	if !strings.Contains(string(audit), `"identity:guest-vm7"`) {
		t.Fatalf("audit log lacks the identity:\n%s", audit)
	}
	// Without a name: a clear error, nothing issued.
	if out, err := testenv.RunErr(nil, bin, "ca", "identity", "--dir", caDir, "--name", "", "--out-cert", cert, "--out-key", key); err == nil || !strings.Contains(out, "--name") {
		t.Fatalf("no name: %v %s", err, out)
	}
}

// An SM2 CA (`--key-type sm2`): the EK certificates it issues verify
// under its SM2 root with OpenSSL and gmsm, enrollment stays idempotent,
// and its CRL verifies too.
func TestCASM2(t *testing.T) {
	dir, bin := t.TempDir(), testenv.Binary(t, testenv.Cvtpm)
	policy := simChipCA(t, dir, "")
	caDir := filepath.Join(dir, "ca")
	c := startCA(t, caDir, policy, filepath.Join(dir, "kds"), "--key-type", "sm2")

	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	enroll := func() string {
		return testenv.Run(t, nil, bin, "enroll", "--tpm-socket", srv.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-sm2", "--csv-sim", filepath.Join(dir, "chip"))
	}
	enroll()
	if again := enroll(); strings.Count(again, "already there") != 2 {
		t.Fatalf("second enrollment under an SM2 CA was not idempotent:\n%s", again)
	}
	tt := tools{tb: t, tcti: srv.TCTI(), dir: dir}
	tt.run("tpm2_nvread", "0x01c00002", "-C", "o", "-o", tt.path("ek.der"))
	der, _ := os.ReadFile(tt.path("ek.der"))
	rootPEM, _ := os.ReadFile(filepath.Join(caDir, "ca.pem"))
	blk, _ := pem.Decode(rootPEM)
	if err := pkisig.SignedBy(der, blk.Bytes); err != nil {
		t.Fatalf("gmsm: the EK certificate does not verify under the SM2 root: %v", err)
	}
	os.WriteFile(tt.path("ek.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	text := testenv.Run(t, nil, "openssl", "x509", "-in", tt.path("ek.pem"), "-noout", "-text")
	if !strings.Contains(text, "SM2-with-SM3") && !strings.Contains(text, "sm2sign-with-sm3") {
		t.Fatalf("the EK certificate is not signed with SM2/SM3:\n%s", text)
	}
	// OpenSSL 3 does not assume SM2's default distinguishing ID
	// (GB/T 32918: "1234567812345678", which gmsm signs with): pass it.
	for _, tc := range []struct{ cert, root string }{{tt.path("ek.pem"), "ca.pem"}, {func() string {
		cert, key := tt.path("id.pem"), tt.path("id.key")
		testenv.Run(t, nil, bin, "ca", "identity", "--dir", caDir, "--name", "guest-sm2", "--out-cert", cert, "--out-key", key)
		return cert
	}(), "identity-ca.pem"}} {
		out, err := testenv.RunErr(nil, testenv.Tool(t, "openssl"), "verify", "-vfyopt", "distid:1234567812345678", "-CAfile", filepath.Join(caDir, tc.root), tc.cert)
		if err != nil || !strings.Contains(out, ": OK") {
			t.Fatalf("openssl verify of an SM2-signed certificate: %v\n%s", err, out)
		}
	}
	r, err := http.Get(c.CRLURL(ca.PurposeEK) + "?format=pem")
	if err != nil {
		t.Fatal(err)
	}
	crl, _ := io.ReadAll(r.Body)
	r.Body.Close()
	cblk, _ := pem.Decode(crl)
	if cblk == nil {
		t.Fatalf("CRL is not PEM: %q", crl)
	}
	list, err := smx509.ParseRevocationList(cblk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	root, err := smx509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := list.CheckSignatureFrom(root); err != nil {
		t.Fatalf("the SM2 CRL does not verify under the root: %v", err)
	}
}

// reenroll "never" holds across a CA restart: the EK of record lives in the
// CA's store, not in the process.
func TestReenrollNeverAcrossRestart(t *testing.T) {
	dir, bin := t.TempDir(), testenv.Binary(t, testenv.Cvtpm)
	policy := simChipCA(t, dir, `,"reenroll":"never"`)
	caDir := filepath.Join(dir, "ca")
	c := startCA(t, caDir, policy, filepath.Join(dir, "kds"))
	first := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	testenv.Run(t, nil, bin, "enroll", "--tpm-socket", first.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip"))
	c.Restart(t)
	// Another TPM (other EKs) claims to be vm-a after the restart.
	second := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	out, err := testenv.RunErr(nil, bin, "enroll", "--tpm-socket", second.DataPath, "--ca", c.Addr, "--ca-fingerprint", c.Fingerprint, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip"))
	if err == nil || !strings.Contains(out, ca.ReasonReenroll) {
		t.Fatalf("re-enrollment of vm-a with other EKs after a CA restart under reenroll never: %v\n%s", err, out)
	}
}

// simChipCA simulates chip SIMCHIP0001 in dir/chip (approved measurement
// 5e..5e), puts its HSK+CEK in the offline directory dir/kds, and writes a
// CA policy trusting it (extra: more JSON fields); it returns the policy.
func simChipCA(t *testing.T, dir, extra string) string {
	t.Helper()
	measure := strings.Repeat("5e", 32)
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "csv", "simulate", "--out", filepath.Join(dir, "chip"), "--chip", "SIMCHIP0001", "--measure", measure, "--policy", "0x7")
	os.MkdirAll(filepath.Join(dir, "kds", "hsk_cek", "SIMCHIP0001"), 0o700)
	b, _ := os.ReadFile(filepath.Join(dir, "chip", "hsk_cek.cert"))
	os.WriteFile(filepath.Join(dir, "kds", "hsk_cek", "SIMCHIP0001", "hsk_cek.cert"), b, 0o600)
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{"simulator_roots":["`+filepath.Join(dir, "chip", "hrk.cert")+`"],"approved_measurements":["`+measure+`"]`+extra+`}`), 0o600)
	return policy
}

// A CA port relayed by an attacker who answers with a CA of its own
// (roots, certificates it chose): enroll, pinned to the real CA's
// fingerprint, refuses to talk to it, and nothing is written to NV.
func TestEnrollRefusesUnpinnedCA(t *testing.T) {
	dir, bin := t.TempDir(), testenv.Binary(t, testenv.Cvtpm)
	policy := simChipCA(t, dir, "")
	real := startCA(t, filepath.Join(dir, "ca"), policy, filepath.Join(dir, "kds"))
	if out := strings.TrimSpace(testenv.Run(t, nil, bin, "ca", "fingerprint", "--dir", real.Dir)); out != real.Fingerprint {
		t.Fatalf("cvtpm ca fingerprint printed %q, want %q", out, real.Fingerprint)
	}
	// The attacker's CA would issue (same policy): only the pin stops it.
	fake := startCA(t, filepath.Join(dir, "fake-ca"), policy, filepath.Join(dir, "kds"))
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	for _, tc := range []struct{ name, addr, fp, want string }{
		{"the attacker's CA at the real CA's address", fake.Addr, real.Fingerprint, "not the pinned"},
		{"no fingerprint", real.Addr, "", "--ca-fingerprint is required"},
		{"malformed fingerprint", real.Addr, "abc", "64 hex digits"},
	} {
		out, err := testenv.RunErr(nil, bin, "enroll", "--tpm-socket", srv.DataPath, "--ca", tc.addr, "--ca-fingerprint", tc.fp,
			"--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip"), "--timeout", "10s")
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("%s: %v\n%s\nwant %q", tc.name, err, out, tc.want)
		}
	}
	tt := tools{tb: t, tcti: srv.TCTI(), dir: dir}
	if out, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tt.tcti}, "tpm2_nvreadpublic", "0x01c00002"); err == nil {
		t.Fatalf("an EK certificate index exists after refused enrollments:\n%s", out)
	}
	// The real CA, pinned: enrolled.
	testenv.Run(t, nil, bin, append([]string{"enroll", "--tpm-socket", srv.DataPath, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip")}, real.ClientFlags()...)...)
}

// reenroll "never" holds across two CA replicas sharing one PostgreSQL
// (the EK of record is checked and updated in one transaction there): an
// instance enrolled through one replica cannot be enrolled with other EKs
// through the other.
func TestReenrollNeverAcrossReplicas(t *testing.T) {
	dir, bin := t.TempDir(), testenv.Binary(t, testenv.Cvtpm)
	policy := simChipCA(t, dir, `,"reenroll":"never"`)
	pg := testenv.StartPostgres(t)
	first := startCA(t, filepath.Join(dir, "ca1"), policy, filepath.Join(dir, "kds"), "--postgres", pg)
	// The second replica runs with a copy of the first's roots and keys.
	os.MkdirAll(filepath.Join(dir, "ca2"), 0o700)
	for _, p := range ca.Purposes {
		for _, ext := range []string{".pem", ".key"} {
			name := strings.TrimSuffix(ca.RootFileName(p), ".pem") + ext
			b, err := os.ReadFile(filepath.Join(first.Dir, name))
			if err != nil {
				t.Fatal(err)
			}
			os.WriteFile(filepath.Join(dir, "ca2", name), b, 0o600)
		}
	}
	second := startCA(t, filepath.Join(dir, "ca2"), policy, filepath.Join(dir, "kds"), "--postgres", pg)
	tpm1 := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	testenv.Run(t, nil, bin, append([]string{"enroll", "--tpm-socket", tpm1.DataPath, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip")}, first.ClientFlags()...)...)
	tpm2 := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	out, err := testenv.RunErr(nil, bin, append([]string{"enroll", "--tpm-socket", tpm2.DataPath, "--instance", "vm-a", "--csv-sim", filepath.Join(dir, "chip")}, second.ClientFlags()...)...)
	if err == nil || !strings.Contains(out, ca.ReasonReenroll) {
		t.Fatalf("vm-a with other EKs through the second replica under reenroll never: %v\n%s", err, out)
	}
}
