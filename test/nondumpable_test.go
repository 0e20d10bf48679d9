package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/test/testenv"
)

// The daemons that hold keys make themselves non-dumpable at start, as the
// backend does: a process of their user without CAP_SYS_PTRACE cannot read
// their memory, descriptors or environment through /proc, nor attach to
// them, and a crash writes no core file with their keys. Tested with each
// daemon run as an unprivileged user (a root process holds every
// capability, which the kernel would require of the reader in any case):
// the CA (which is also the key broker), the verifier, the guest proxy and
// the frontend. The backend is tested in internal/confine.
func TestKeyHoldingDaemonsAreNotDumpable(t *testing.T) {
	testenv.NeedNobody(t)
	e := startAttestEnv(t, "vm1")
	// The test's files (certificates, policies, the simulator's roots)
	// readable by uid 65534, and a directory of its own to write in.
	if out, err := exec.Command("chmod", "-R", "a+rX", e.files.Dir).CombinedOutput(); err != nil {
		t.Fatalf("chmod: %v %s", err, out)
	}
	own := testenv.OpenTempDir(t, "cvtpm-nondumpable-", 0o700)
	if err := os.Chown(own, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	policy, certDir := e.files.Policy, e.files.CertDir
	cert, key := e.files.Certs["guest-vm1"][0], e.files.Certs["guest-vm1"][1]
	hskCEK := filepath.Join(e.files.SimDir, csv.SimHSKCEKFile)
	ekRoot, akRoot := e.ca.RootFile(ca.PurposeEK), e.ca.RootFile(ca.PurposeAK)
	bin := testenv.Binary(t, testenv.Cvtpm)
	port := func() string { return fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)) }

	caAddr, caHTTP := port(), port()
	caD := testenv.StartCommand(t, "ca", []string{"tcp:" + caAddr, "tcp:" + caHTTP}, testenv.AsNobody(bin, "ca", "--dir", filepath.Join(own, "ca"),
		"--policy", policy, "--hsk-cek", hskCEK, "--listen", caAddr, "--http", caHTTP)...)
	vAddr := port()
	verifier := testenv.StartCommand(t, "verifier", []string{"tcp:" + vAddr}, testenv.AsNobody(bin, "verifier", "--ek-root", ekRoot, "--ak-root", akRoot,
		"--crl", e.ca.CRLURL(ca.PurposeEK), "--crl", e.ca.CRLURL(ca.PurposeAK), "--policy", policy, "--cert-dir", certDir,
		"--token-key", filepath.Join(own, "verifier.key"), "--listen", vAddr, "--http", "")...)
	proxyAddr := port()
	proxy := testenv.StartCommand(t, "guest proxy", []string{"tcp:" + proxyAddr}, testenv.AsNobody(bin, "guest", "proxy", "--link", e.topo.LinkAddr,
		"--instance", "vm1", "--tls-cert", cert, "--tls-key", key, "--policy", policy, "--cert-dir", certDir, "--tcp", proxyAddr)...)
	relayAddr := "tcp:" + port()
	relay := testenv.StartCommand(t, "frontend relay", []string{relayAddr}, testenv.AsNobody(bin, "frontend", "--backend", e.topo.LinkAddr, "--relay", relayAddr)...)
	for _, d := range []*testenv.Daemon{caD, verifier, proxy, relay} {
		if ok, _ := testenv.EnvironReadableByNobody(d.Cmd.Process.Pid); ok {
			t.Errorf("%s (pid %d) is dumpable: another process of its user read its /proc/PID/environ", d.Name, d.Cmd.Process.Pid)
		}
	}
}
