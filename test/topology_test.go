package test

// Issue 4 end to end: backend, frontend relay and guest proxy as separate
// processes, tpm2-tools in the "guest".

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/attest/freshreport"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// The NV secret the guest writes; the relay must never see it.
const nvSecret = "cvtpm-e2e-secret-7f3a9c"

func TestGuestProxyThroughRelay(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	if out := topo.Admin(t, "list"); !strings.Contains(out, "vm1") || !strings.Contains(out, "running") {
		t.Fatalf("list:\n%s", out)
	}
	relay, capture := topo.StartRelay(t)
	_, tcti := topo.StartGuestProxy(t, relay, "guest-vm1", "vm1", f.Policy)
	env := []string{"TPM2TOOLS_TCTI=" + tcti}
	dir := t.TempDir()
	run := func(args ...string) string { return testenv.Run(t, env, args[0], args[1:]...) }

	run("tpm2_startup", "-c")
	if out := run("tpm2_getrandom", "--hex", "16"); len(strings.TrimSpace(out)) != 32 {
		t.Fatalf("getrandom: %q", out)
	}
	run("tpm2_pcrextend", "16:sha256="+strings.Repeat("ab", 32))
	out := run("tpm2_pcrread", "sha256:16")
	// PCR16 = SHA256(0^32 || ab^32)
	if !strings.Contains(strings.ToLower(out), "0x") {
		t.Fatalf("pcrread: %s", out)
	}
	run("tpm2_createek", "-c", filepath.Join(dir, "ek.ctx"), "-G", "ecc", "-u", filepath.Join(dir, "ek.pub"))
	run("tpm2_createak", "-C", filepath.Join(dir, "ek.ctx"), "-c", filepath.Join(dir, "ak.ctx"), "-G", "ecc", "-g", "sha256", "-s", "ecdsa", "-u", filepath.Join(dir, "ak.pub"), "-f", "pem", "-n", filepath.Join(dir, "ak.name"))
	run("tpm2_flushcontext", "-t")
	run("tpm2_quote", "-c", filepath.Join(dir, "ak.ctx"), "-l", "sha256:0,16", "-q", "abcdef01", "-m", filepath.Join(dir, "q.msg"), "-s", filepath.Join(dir, "q.sig"), "-o", filepath.Join(dir, "q.pcrs"), "-g", "sha256")
	run("tpm2_checkquote", "-u", filepath.Join(dir, "ak.pub"), "-m", filepath.Join(dir, "q.msg"), "-s", filepath.Join(dir, "q.sig"), "-f", filepath.Join(dir, "q.pcrs"), "-g", "sha256", "-q", "abcdef01")
	if _, err := testenv.RunErr(env, testenv.Tool(t, "tpm2_checkquote"), "-u", filepath.Join(dir, "ak.pub"), "-m", filepath.Join(dir, "q.msg"), "-s", filepath.Join(dir, "q.sig"), "-f", filepath.Join(dir, "q.pcrs"), "-g", "sha256", "-q", "abcdef02"); err == nil {
		t.Fatal("checkquote accepted a wrong nonce")
	}
	secret := filepath.Join(dir, "secret")
	os.WriteFile(secret, []byte(nvSecret), 0o600)
	run("tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
	run("tpm2_nvwrite", "0x1500016", "-C", "o", "-i", secret)
	if got := run("tpm2_nvread", "0x1500016", "-C", "o", "-s", itoa(len(nvSecret))); got != nvSecret {
		t.Fatalf("nvread = %q", got)
	}

	// What the host relayed: plenty of bytes, none of them readable.
	seen, err := os.ReadFile(capture)
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) < 10000 {
		t.Fatalf("relay captured only %d bytes: did the session pass through it?", len(seen))
	}
	for name, needle := range map[string][]byte{
		"NV secret":                  []byte(nvSecret),
		"TPM2_NV_Write command code": {0x00, 0x00, 0x01, 0x37},
		"TPM2_Quote command code":    {0x00, 0x00, 0x01, 0x58},
		"quote nonce":                {0xab, 0xcd, 0xef, 0x01},
		"GetRandom command":          {0x80, 0x01, 0x00, 0x00, 0x00, 0x0c, 0x00, 0x00, 0x01, 0x7b},
		"extended digest":            bytes.Repeat([]byte{0xab}, 16),
	} {
		if bytes.Contains(seen, needle) {
			t.Errorf("the relay saw the %s in clear", name)
		}
	}

	// The host's frontend relay cannot read, and a guest identity reaches
	// only its own instance.
	_, tcti2 := topo.StartGuestProxy(t, relay, "guest-vm2", "vm1", f.Policy)
	if out, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti2}, testenv.Tool(t, "tpm2_getrandom"), "8"); err == nil {
		t.Fatalf("guest-vm2 used vm1: %s", out)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

// A backend whose evidence fails the client's policy is refused by the
// guest proxy and the frontend before any TPM command is sent.
func TestUntrustedBackendRefused(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	onlyRealRoot := f.WritePolicy(t, "real-only.json", csv.AppraisalPolicy{ApprovedMeasurements: []string{hex.EncodeToString(f.Measure[:])}})
	otherMeasure := f.WritePolicy(t, "other.json", csv.AppraisalPolicy{
		SimulatorRoots:       []string{filepath.Join(f.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{strings.Repeat("00", 32)},
	})
	minAPI := f.WritePolicy(t, "api.json", csv.AppraisalPolicy{
		SimulatorRoots:       []string{filepath.Join(f.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{hex.EncodeToString(f.Measure[:])},
		MinAPI:               "99.0",
	})
	c := f.Certs["guest-vm1"]
	fc := f.Certs["frontend"]
	// A backend in a CVM whose guest policy allows debugging (no NODBG),
	// with the same clients and the same simulated chip root.
	dbg := testenv.NewTopologyFiles(t, 0x6)
	dbgTopo := testenv.StartBackend(t, dbg)
	dbgTopo.Admin(t, "create", "vm1")
	for _, tc := range []struct{ name, policy, reason, link string }{
		{"simulated root, only the real HRK trusted", onlyRealRoot, csv.ReasonUntrustedRoot, topo.LinkAddr},
		{"unexpected measurement", otherMeasure, csv.ReasonMeasurement, topo.LinkAddr},
		{"firmware too old", minAPI, csv.ReasonAPIVersion, topo.LinkAddr},
		{"debug policy", "", csv.ReasonDebug, dbgTopo.LinkAddr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, fc, policy, certDir := c, fc, tc.policy, f.CertDir
			if tc.policy == "" { // the debug backend's own files
				c, fc, policy, certDir = dbg.Certs["guest-vm1"], dbg.Certs["frontend"], dbg.Policy, dbg.CertDir
			}
			tc.policy = policy
			out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "guest", "proxy", "--link", tc.link, "--instance", "vm1",
				"--tls-cert", c[0], "--tls-key", c[1], "--policy", tc.policy, "--cert-dir", certDir, "--tcp", "127.0.0.1:1")
			if err == nil || !strings.Contains(out, tc.reason) {
				t.Fatalf("guest proxy: err=%v, output:\n%s\nwant %q", err, out, tc.reason)
			}
			sock := filepath.Join(testenv.SockDir(t), "ctrl")
			out, err = testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "frontend", "--backend", tc.link,
				"--tls-cert", fc[0], "--tls-key", fc[1], "--policy", tc.policy, "--cert-dir", certDir, "--vm", "vm1="+sock)
			if err == nil || !strings.Contains(out, tc.reason) {
				t.Fatalf("frontend: err=%v, output:\n%s\nwant %q", err, out, tc.reason)
			}
		})
	}
}

// QEMU boots with -tpmdev emulator on the frontend's socket; the TPM is an
// instance in the separate backend process.
func TestQEMUThroughFrontend(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	ctrl := filepath.Join(f.Dir, "vm1.ctrl")
	fc := f.Certs["frontend"]
	front := testenv.StartDaemon(t, "frontend", []string{"unix:" + ctrl}, "frontend", "--backend", topo.LinkAddr,
		"--tls-cert", fc[0], "--tls-key", fc[1], "--policy", f.Policy, "--cert-dir", f.CertDir, "--vm", "vm1="+ctrl)
	// An EK at 0x81010001 for the fresh-report command (enrollment would
	// put it there too).
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	env := []string{"TPM2TOOLS_TCTI=" + tcti}
	testenv.Run(t, env, "tpm2_startup", "-c")
	testenv.Run(t, env, "tpm2_createek", "-c", "0x81010001", "-G", "rsa")
	got := bootWith(t, ctrl, "frontend", logs{front.Log, topo.Backend.Log}, "tpm-crb")
	if got["TPM0"] != "present" || got["MAJOR"] != "2" {
		t.Fatalf("guest sees tpm0=%q major=%q", got["TPM0"], got["MAJOR"])
	}
	// The guest's own TPM path (kernel -> QEMU -> frontend -> backend)
	// answered the fresh-report vendor command.
	respReport, _ := hex.DecodeString(got["FRESH0"])
	respCerts, _ := hex.DecodeString(got["FRESH1"])
	rep, err := freshreport.ParseResponse(respReport)
	if err != nil {
		t.Fatalf("fresh report through QEMU (%q): %v", got["FRESH0"], err)
	}
	certs, err := freshreport.ParseResponse(respCerts)
	if err != nil {
		t.Fatalf("chip certificates through QEMU: %v", err)
	}
	hsk, cek, err := csv.ParseHSKCEK(certs.Payload)
	if err != nil {
		t.Fatal(err)
	}
	v := csv.NewVerifier(csv.VerifierOptions{TrustedRoots: []*csv.CACert{f.Sim.HRK}, Certs: csv.StaticSource{HSK: hsk, CEK: cek}})
	want := freshreport.ReportData([]byte("qemu-guest-probe-nonce"), rep.EKPublic, "vm1")
	if _, err := v.Verify(context.Background(), rep.Payload, want[:]); err != nil || rep.Instance != "vm1" {
		t.Fatalf("report fetched by the guest through QEMU (instance %q): %v", rep.Instance, err)
	}
	if pcr0 := got["PCR0"]; len(pcr0) != 64 || pcr0 == strings.Repeat("0", 64) {
		t.Fatalf("PCR0 = %q: the firmware's measurements did not reach the backend's TPM", pcr0)
	}
	// QEMU's ordinary commands went through a direct session with the
	// instance's worker (the frontend's --direct default).
	handed := false
	for _, l := range strings.Split(topo.Backend.Log.String(), "\n") {
		handed = handed || strings.Contains(l, "direct session handed to the instance's worker") && strings.Contains(l, "frontend")
	}
	if !handed {
		t.Fatalf("the frontend's session was not handed to the worker:\n%s", topo.Backend.Log)
	}
	// Through /dev/tpmrm0: the kernel's resource manager passes commands
	// the TPM lists; Linux 6.3 and later match vendor commands (the V
	// bit) against that list, earlier kernels refuse every vendor command
	// there (TSS2_RESMGR_TPM_RC_LAYER | TPM_RC_COMMAND_CODE), which is why
	// guest attest falls back to /dev/tpmN.
	wantRM := "rc00000000"
	if kernelBefore(t, 6, 3) {
		wantRM = fmt.Sprintf("rc%08x", freshreport.RCResourceManagerCommandCode)
	}
	if got["FRESHRM"] != wantRM {
		t.Fatalf("fresh report through /dev/tpmrm0: %q, want %q", got["FRESHRM"], wantRM)
	}
	t.Logf("guest via frontend -> backend: PCR0=%s", got["PCR0"])
}

// kernelBefore reports whether the guest kernel (kernel(t)) is older than
// major.minor.
func kernelBefore(t *testing.T, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(filepath.Base(kernel(t)), "vmlinuz-%d.%d", &ma, &mi); err != nil {
		t.Fatalf("guest kernel version of %s: %v", kernel(t), err)
	}
	return ma < major || ma == major && mi < minor
}

type logs []fmt.Stringer

func (l logs) String() string {
	var b strings.Builder
	for _, s := range l {
		b.WriteString(s.String())
		b.WriteString("\n---\n")
	}
	return b.String()
}

// The fresh-report vendor command through the guest proxy: a CSV report
// bound to the caller's nonce, the instance's EK and its id.
func TestFreshReportCommand(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	env := []string{"TPM2TOOLS_TCTI=" + tcti}
	testenv.Run(t, env, "tpm2_startup", "-c")
	testenv.Run(t, env, "tpm2_createek", "-c", "0x81010001", "-G", "rsa")

	port := tcti[strings.LastIndex(tcti, "=")+1:]
	tpm, err := tpmsock.Dial(context.Background(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	// Listed as the Linux kernel enumerates commands (what /dev/tpmrm0
	// passes): TPM_PT_TOTAL_COMMANDS entries from TPM2_CC_FIRST, the
	// vendor command among them.
	props, err := (tpm2.GetCapability{Capability: tpm2.TPMCapTPMProperties, Property: 0x129, PropertyCount: 1}).Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	tp, _ := props.CapabilityData.Data.TPMProperties()
	total := tp.TPMProperty[0].Value
	cmds, err := (tpm2.GetCapability{Capability: tpm2.TPMCapCommands, Property: 0x11f, PropertyCount: total}).Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	cca, _ := cmds.CapabilityData.Data.Command()
	listed := false
	for _, a := range cca.CommandAttributes {
		if uint32(a.CommandIndex) == 0x0101 && a.V {
			listed = true
		}
	}
	if uint32(len(cca.CommandAttributes)) != total || !listed {
		t.Fatalf("TPM_PT_TOTAL_COMMANDS %d, %d commands listed, vendor command 0x20000101 among them: %v", total, len(cca.CommandAttributes), listed)
	}
	nonce := []byte("verifier nonce 0123456789abcdef")
	report, hskCEK, res, err := freshreport.Get(tpm, nonce, 0x81010001)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := (tpm2.ReadPublic{ObjectHandle: tpm2.TPMHandle(0x81010001)}).Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	if res.Instance != "vm1" || !bytes.Equal(res.EKPublic, pub.OutPublic.Bytes()) {
		t.Fatalf("instance %q, EK public matches: %v", res.Instance, bytes.Equal(res.EKPublic, pub.OutPublic.Bytes()))
	}
	hsk, cek, err := csv.ParseHSKCEK(hskCEK)
	if err != nil {
		t.Fatal(err)
	}
	v := csv.NewVerifier(csv.VerifierOptions{TrustedRoots: []*csv.CACert{f.Sim.HRK}, Certs: csv.StaticSource{HSK: hsk, CEK: cek}})
	want := freshreport.ReportData(nonce, res.EKPublic, "vm1")
	claims, err := v.Verify(context.Background(), report, want[:])
	if err != nil {
		t.Fatalf("fresh report: %v", err)
	}
	if !bytes.Equal(claims.Measure, f.Measure[:]) {
		t.Fatalf("measure %x", claims.Measure)
	}
	// Bound to the nonce: another nonce's report_data does not verify.
	other := freshreport.ReportData([]byte("other"), res.EKPublic, "vm1")
	if _, err := v.Verify(context.Background(), report, other[:]); err == nil {
		t.Fatal("report verified for another nonce")
	}
	// A missing EK is a TPM error, not a report.
	if _, _, _, err := freshreport.Get(tpm, nonce, 0x81010099); err == nil {
		t.Fatal("report for an absent EK handle")
	}
}

// A backend restart (a CVM reboot) drops every session: the guest proxy
// attests a new one on the next command, and the instance's NV is intact.
func TestBackendRestartUnderGuestProxy(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	env := []string{"TPM2TOOLS_TCTI=" + tcti}
	dir := t.TempDir()
	value := filepath.Join(dir, "v")
	os.WriteFile(value, []byte("survives a backend restart"), 0o600)
	testenv.Run(t, env, "tpm2_startup", "-c")
	testenv.Run(t, env, "tpm2_nvdefine", "0x1500018", "-C", "o", "-s", "26", "-a", "ownerread|ownerwrite")
	testenv.Run(t, env, "tpm2_nvwrite", "0x1500018", "-C", "o", "-i", value)

	topo.RestartBackend(t)
	// The first command after the restart finds the old session gone and
	// fails; the proxy then attests a new session. The backend's new
	// worker is initialised but not started up, as after a reboot.
	testenv.RunErr(env, testenv.Tool(t, "tpm2_getrandom"), "4")
	testenv.Run(t, env, "tpm2_startup", "-c")
	if got := testenv.Run(t, env, "tpm2_nvread", "0x1500018", "-C", "o", "-s", "26"); got != "survives a backend restart" {
		t.Fatalf("NV after the backend restart: %q", got)
	}
}

// The frontend checks each --vm before it serves: an instance the backend
// does not have, or one its identity may not use, ends it at start with
// one line naming the --vm, instead of "serving" and failing at the VM's
// boot.
func TestFrontendChecksInstancesAtStart(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	bin := testenv.Binary(t, testenv.Cvtpm)
	for _, tc := range []struct{ identity, instance, want string }{
		{"frontend", "nosuchvm", "nosuchvm"},
		{"guest-vm2", "vm1", `client "guest-vm2" may not use instance "vm1"`},
	} {
		c := f.Certs[tc.identity]
		ctrl := filepath.Join(testenv.SockDir(t), tc.instance+".ctrl")
		out, code, timedOut := runBriefly(bin, []string{"frontend", "--backend", topo.LinkAddr, "--tls-cert", c[0], "--tls-key", c[1],
			"--policy", f.Policy, "--cert-dir", f.CertDir, "--vm", tc.instance + "=" + ctrl}, 10*time.Second)
		msg := errorLines(out)
		if timedOut || code != 1 || len(msg) != 1 || !strings.Contains(msg[0], "--vm "+tc.instance) || !strings.Contains(msg[0], tc.want) {
			t.Errorf("frontend as %s for %s: exit %d (still running: %v), want 1 and one line naming --vm and %q:\n%s", tc.identity, tc.instance, code, timedOut, tc.want, out)
		}
		if strings.Contains(out, "serving a VM's TPM") {
			t.Errorf("frontend as %s for %s said it was serving:\n%s", tc.identity, tc.instance, out)
		}
	}
}
