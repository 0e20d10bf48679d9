package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"cvtpm/ca"
	"cvtpm/guestkit"
	"cvtpm/test/testenv"
)

// A bad value for any flag of any subcommand is refused before the command
// does anything: exit 1 or 2, one line naming the flag, no stack trace. A
// daemon that accepted the value would start serving instead (it is given
// a configuration that otherwise starts), a client would fail later on its
// unreachable peer with another message. The flags come from each
// command's --help, so a new flag is checked without touching this test;
// the few that take any text are listed with why.
func TestCLIBadValues(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	f := testenv.NewTopologyFiles(t, 0x7)
	dir := t.TempDir()
	c := startCAProc(t, filepath.Join(dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, "hsk_cek.cert"))
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	verifierPub := filepath.Join(dir, "verifier.pub.pem")
	testenv.Run(t, nil, "openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", filepath.Join(dir, "verifier.key"))
	testenv.Run(t, nil, "openssl", "pkey", "-in", filepath.Join(dir, "verifier.key"), "-pubout", "-out", verifierPub)
	eventLog := filepath.Join(dir, "events.log")
	os.WriteFile(eventLog, guestkit.NewEventLog().Bytes(), 0o600)
	n := 0
	fresh := func(name string) string { n++; return filepath.Join(dir, fmt.Sprintf("%s-%d", name, n)) }
	gc, fc := f.Certs["guest-vm1"], f.Certs["frontend"]

	// Text any value of which is valid (names chosen by the operator).
	anyText := map[string]string{
		"name": "an identity's name", "instance": "an instance id", "backend-id": "a name at the key broker",
		"migration-domain": "a name at the key broker", "chip": "a simulated chip's serial", "tls-name": "a DNS name for the CA's certificate",
	}
	for _, tc := range []struct {
		cmd    []string
		base   func() []string // flags that otherwise run (or fail late)
		args   []string        // positional arguments
		daemon bool
	}{
		{[]string{"ca"}, func() []string {
			return []string{"--dir", fresh("ca"), "--policy", f.Policy, "--hsk-cek", filepath.Join(f.SimDir, "hsk_cek.cert"), "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"}
		}, nil, true},
		{[]string{"ca", "revoke"}, func() []string { return []string{"--dir", c.Dir, "--reason", "1"} }, []string{"01"}, false},
		{[]string{"ca", "identity"}, func() []string {
			return []string{"--dir", c.Dir, "--name", "n", "--out-cert", fresh("id.pem"), "--out-key", fresh("id.key")}
		}, nil, false},
		{[]string{"ca", "fingerprint"}, func() []string { return []string{"--dir", c.Dir} }, nil, false},
		{[]string{"enroll"}, func() []string {
			return []string{"--tpm-socket", filepath.Join(dir, "none.sock"), "--ca", "127.0.0.1:1", "--ca-fingerprint", c.Fingerprint, "--instance", "x", "--csv-sim", f.SimDir}
		}, nil, false},
		{[]string{"backend"}, func() []string {
			return []string{"--dir", fresh("backend"), "--master-key-file", f.MasterKey, "--client-ca", f.ClientCA, "--acl", f.ACL, "--csv-sim", f.SimDir, "--listen", "tcp:127.0.0.1:0"}
		}, nil, true},
		{[]string{"backend", "create"}, func() []string { return []string{"--admin", filepath.Join(dir, "none.sock")} }, []string{"vm9"}, false},
		{[]string{"backend", "list"}, func() []string { return []string{"--admin", filepath.Join(dir, "none.sock")} }, nil, false},
		{[]string{"frontend"}, func() []string {
			return []string{"--backend", topo.LinkAddr, "--tls-cert", fc[0], "--tls-key", fc[1], "--policy", f.Policy, "--cert-dir", f.CertDir,
				"--vm", "vm1=" + filepath.Join(testenv.SockDir(t), fmt.Sprintf("v%d", n))}
		}, nil, true},
		{[]string{"guest", "proxy"}, func() []string {
			return []string{"--link", topo.LinkAddr, "--instance", "vm1", "--tls-cert", gc[0], "--tls-key", gc[1], "--policy", f.Policy, "--cert-dir", f.CertDir, "--tcp", "127.0.0.1:0"}
		}, nil, true},
		{[]string{"guest", "measure"}, func() []string {
			return []string{"--tpm", "unix:" + filepath.Join(dir, "none.sock"), "--event-log", fresh("measure.log")}
		}, []string{"text"}, false},
		{[]string{"guest", "attest"}, func() []string {
			return []string{"--tpm", "unix:" + filepath.Join(dir, "none.sock"), "--ca", "127.0.0.1:1", "--ca-fingerprint", c.Fingerprint,
				"--verifier", "127.0.0.1:1", "--verifier-key", verifierPub, "--event-log", eventLog}
		}, nil, false},
		{[]string{"verifier"}, func() []string {
			return []string{"--ek-root", c.RootFile(ca.PurposeEK), "--ak-root", c.RootFile(ca.PurposeAK), "--no-crl", "--policy", f.Policy,
				"--cert-dir", f.CertDir, "--token-key", filepath.Join(dir, "v.key"), "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"}
		}, nil, true},
		{[]string{"verifier", "reference"}, func() []string { return []string{"--event-log", eventLog, "--out", fresh("ref.json")} }, nil, false},
		{[]string{"csv", "verify"}, func() []string {
			return []string{"--report", filepath.Join(f.SimDir, "report.cert"), "--hsk-cek", filepath.Join(f.SimDir, "hsk_cek.cert"), "--root", filepath.Join(f.SimDir, "hrk.cert")}
		}, nil, false},
		{[]string{"csv", "simulate"}, func() []string {
			return []string{"--out", fresh("sim"), "--chip", "SIMX", "--measure", strings.Repeat("ab", 32), "--policy", "0x7"}
		}, nil, false},
	} {
		for _, fl := range valueFlags(t, bin, tc.cmd) {
			if _, ok := anyText[fl]; ok {
				continue
			}
			t.Run(strings.Join(tc.cmd, "_")+"/"+fl, func(t *testing.T) {
				args := append(slices.Clone(tc.cmd), tc.base()...)
				args = append(append(args, "--"+fl, "/dev/null/cvtpm-bad"), tc.args...)
				out, code, timedOut := runBriefly(bin, args, 8*time.Second)
				if timedOut {
					if tc.daemon {
						t.Fatalf("cvtpm %s accepted --%s /dev/null/cvtpm-bad and kept running:\n%s", strings.Join(tc.cmd, " "), fl, out)
					}
					t.Fatalf("cvtpm %s --%s /dev/null/cvtpm-bad did not end:\n%s", strings.Join(tc.cmd, " "), fl, out)
				}
				msg := errorLines(out)
				if code != 1 && code != 2 || len(msg) != 1 || !strings.Contains(msg[0], "--"+fl) || strings.Contains(out, "goroutine ") {
					t.Fatalf("cvtpm %s --%s /dev/null/cvtpm-bad: exit %d, want 1 or 2 and one line naming --%s:\n%s",
						strings.Join(tc.cmd, " "), fl, code, fl, out)
				}
			})
		}
	}
}

var helpFlagRE = regexp.MustCompile(`(?m)^  -([a-z0-9-]+) (\S+)\n\s+(.*)$`)

// valueFlags lists the flags of a subcommand that take a value, from its
// --help, leaving out the old names of renamed flags.
func valueFlags(t *testing.T, bin string, cmd []string) []string {
	t.Helper()
	out, _ := exec.Command(bin, append(slices.Clone(cmd), "--help")...).CombinedOutput()
	var flags []string
	for _, m := range helpFlagRE.FindAllStringSubmatch(string(out), -1) {
		if strings.HasPrefix(m[3], "old name of --") {
			continue
		}
		flags = append(flags, m[1])
	}
	if len(flags) == 0 {
		t.Fatalf("cvtpm %v --help lists no flags:\n%s", cmd, out)
	}
	return flags
}

// runBriefly runs bin with args for at most d; it reports the combined
// output, the exit code and whether it was still running.
func runBriefly(bin string, args []string, d time.Duration) (string, int, bool) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		return out.String(), -1, true
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return out.String(), ee.ExitCode(), false
	}
	return out.String(), 0, false
}

// errorLines is the output without the daemon's log lines (slog text or
// JSON): what the command said about its error.
func errorLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if l == "" || strings.HasPrefix(l, "time=") || strings.HasPrefix(l, "{") {
			continue
		}
		lines = append(lines, l)
	}
	return lines
}
