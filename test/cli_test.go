package test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// TestSocketCLIErrors: unknown or malformed options get one line naming
// the option and a non-zero exit.
func TestSocketCLIErrors(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	dir := t.TempDir()
	cases := []struct {
		args []string
		name string // what the message must name
	}{
		{[]string{"--tpm2", "--frobnicate"}, "--frobnicate"},
		{[]string{"--tpm2", "--tpmstate", "dir=" + dir, "--server", "type=carrier-pigeon"}, "--server"},
		{[]string{"--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", "type=tcp,port=notaport"}, "port"},
		{[]string{"--tpm2", "--tpmstate", "dir=" + dir, "--flags", "not-need-init,warp-speed"}, "--flags"},
		{[]string{"--tpm2", "--tpmstate", "dir=" + dir, "--key", "file=/nonexistent/key"}, "--key"},
		{[]string{"--tpm2", "--tpmstate"}, "--tpmstate"},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			out, err := testenv.RunErr(nil, bin, append([]string{"socket"}, tc.args...)...)
			if err == nil {
				t.Fatalf("accepted; output %q", out)
			}
			lines := strings.Split(strings.TrimSpace(out), "\n")
			if len(lines) != 1 || !strings.Contains(lines[0], tc.name) {
				t.Fatalf("want one line naming %s, got %q", tc.name, out)
			}
		})
	}
}

// TestPrintCapabilities: the JSON libvirt reads parses and lists TPM 2.0.
func TestPrintCapabilities(t *testing.T) {
	out := testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "socket", "--tpm2", "--print-capabilities")
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	if err := json.Unmarshal([]byte(out), &caps); err != nil {
		t.Fatalf("--print-capabilities is not JSON: %v\n%s", err, out)
	}
	for _, f := range []string{"tpm-2.0", "tpm-send-command-header", "flags-opt-startup", "cmdarg-key-fd"} {
		if !slices.Contains(caps.Features, f) {
			t.Errorf("feature %q missing from %v", f, caps.Features)
		}
	}
	if caps.Type != "swtpm" || caps.Version == "" {
		t.Errorf("type %q version %q", caps.Type, caps.Version)
	}
}

// TestSwtpmSymlink: the binary started through a symlink named swtpm is a
// full swtpm replacement.
func TestSwtpmSymlink(t *testing.T) {
	link := filepath.Join(t.TempDir(), "swtpm")
	if err := os.Symlink(testenv.Binary(t, testenv.Cvtpm), link); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CVTPM_BIN", link)
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
	if out := tt.run("tpm2_getrandom", "--hex", "4"); len(strings.TrimSpace(out)) != 8 {
		t.Fatalf("tpm2_getrandom through the swtpm symlink: %q", out)
	}
	if !strings.HasSuffix(srv.Cmd.Path, "/swtpm") {
		t.Fatalf("started %s, not the symlink", srv.Cmd.Path)
	}
}

// The verifier refuses settings that would silently weaken a check: a
// misspelt or malformed reference file, and running without a CRL unless
// --no-crl says so.
func TestVerifierStrictSettings(t *testing.T) {
	dir := t.TempDir()
	bin := testenv.Binary(t, testenv.Cvtpm)
	policy := filepath.Join(dir, "policy.json")
	os.WriteFile(policy, []byte(`{}`), 0o600)
	// Any CA certificate will do: the verifier refuses before serving.
	caDir := filepath.Join(dir, "ca")
	os.MkdirAll(filepath.Join(dir, "hsk_cek"), 0o700) // an empty offline HSK+CEK directory
	startCA(t, caDir, policy, dir)
	root, akRoot := filepath.Join(caDir, "ca.pem"), filepath.Join(caDir, "ak-ca.pem")
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), 0o600)
	chipPolicy := filepath.Join(dir, "chips.json")
	os.WriteFile(chipPolicy, []byte(`{"deny_chips": ["FORGED01"]}`), 0o600)
	for _, tc := range []struct {
		name, ref, want string
		extra           []string
	}{
		{"no CRL", "", "--crl URL is required", nil},
		{"no AK root", "", "--ak-root", []string{"--no-crl", "--ak-root", ""}},
		{"garbage EK root", "", "--ek-root", []string{"--no-crl", "--ek-root", garbage}},
		{"misspelt reference key", `{"pcr": {"sha256": {"16": "` + strings.Repeat("ab", 32) + `"}}}`, `unknown field "pcr"`, []string{"--no-crl"}},
		{"malformed PCR value", `{"pcrs": {"sha256": {"16": "zz"}}}`, "not 64 hex digits", []string{"--no-crl"}},
		{"chip lists with the evidence's own HSK+CEK", "", "need HSK+CEK looked up by chip serial", []string{"--no-crl", "--evidence-certs", "--policy", chipPolicy}},
	} {
		args := append([]string{"verifier", "--ek-root", root, "--ak-root", akRoot, "--policy", policy, "--token-key", filepath.Join(dir, "v.key"),
			"--listen", "127.0.0.1:0", "--http", ""}, tc.extra...)
		if tc.ref != "" {
			ref := filepath.Join(dir, "ref.json")
			os.WriteFile(ref, []byte(tc.ref), 0o600)
			args = append(args, "--reference", ref)
		}
		out, err := testenv.RunErr(nil, bin, args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Errorf("%s: %v\n%s\nwant %q", tc.name, err, out, tc.want)
		}
	}
}

// Out of descriptors, `cvtpm socket` slows down instead of exiting: with a
// limit of 64, 100 held connections exhaust it; once they close, the TPM
// serves again.
func TestSocketSurvivesDescriptorExhaustion(t *testing.T) {
	port := testenv.FreePort(t)
	cmd := exec.Command("prlimit", "--nofile=64:64", testenv.Binary(t, testenv.Cvtpm), "socket", "--tpm2",
		"--tpmstate", "dir="+t.TempDir(), "--flags", "not-need-init,startup-clear",
		"--server", fmt.Sprintf("type=tcp,port=%d", port), "--ctrl", fmt.Sprintf("type=tcp,port=%d", port+1))
	log := &strings.Builder{}
	cmd.Stderr = log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill(); <-exited })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	var conns []net.Conn
	for i := 0; i < 200 && len(conns) == 0; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for range 100 {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break
		}
		conns = append(conns, c)
	}
	time.Sleep(300 * time.Millisecond)
	for _, c := range conns {
		c.Close()
	}
	select {
	case err := <-exited:
		t.Fatalf("cvtpm socket exited when out of descriptors: %v\n%s", err, log)
	case <-time.After(500 * time.Millisecond):
	}
	env := []string{fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", port)}
	if out, err := testenv.RunErr(env, "tpm2_getrandom", "--hex", "4"); err != nil {
		t.Fatalf("after the flood: %v\n%s\n%s", err, out, log)
	}
}

// `cvtpm --version`, `cvtpm version` and the verifier's --version name the
// program and the commit it was built from.
func TestVersion(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--version"}, "cvtpm commit "},
		{[]string{"version"}, "cvtpm commit "},
		{[]string{"verifier", "--version"}, "cvtpm-verifier commit "},
	} {
		out, err := testenv.RunErr(nil, bin, tc.args...)
		if err != nil || !strings.HasPrefix(out, tc.want) {
			t.Errorf("cvtpm %v: %v %q, want %q...", tc.args, err, out, tc.want)
		}
	}
}

// One grammar for every subcommand: --version prints cvtpm's version,
// --help exits 0, a missing required flag exits 2 with one line, a bad
// value exits 1 or 2 with one line naming the flag, and none of them
// prints a stack trace.
func TestCLITable(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "acl.json"), []byte(`{"clients": {}}`), 0o600)
	os.WriteFile(filepath.Join(dir, "key"), []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	testenv.Run(t, nil, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", filepath.Join(dir, "ca.key"), "-out", filepath.Join(dir, "ca.pem"), "-subj", "/CN=t", "-days", "1",
		"-addext", "basicConstraints=critical,CA:TRUE")
	commands := [][]string{{"ca"}, {"ca", "revoke"}, {"ca", "identity"}, {"ca", "fingerprint"}, {"enroll"}, {"backend"},
		{"backend", "create"}, {"backend", "list"}, {"frontend"}, {"guest", "proxy"}, {"guest", "measure"},
		{"verifier"}, {"verifier", "reference"}, {"csv", "verify"}, {"csv", "simulate"}}
	run := func(args ...string) (string, int) {
		out, err := testenv.RunErr(nil, bin, args...)
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		if strings.Contains(out, "goroutine ") || strings.Contains(out, "panic:") {
			t.Errorf("%v printed a stack trace:\n%s", args, out)
		}
		return strings.TrimSpace(out), code
	}
	for _, c := range commands {
		if out, code := run(append(slices.Clone(c), "--version")...); code != 0 || !strings.Contains(out, "cvtpm") {
			t.Errorf("%v --version: exit %d, %q", c, code, out)
		}
		if _, code := run(append(slices.Clone(c), "--help")...); code != 0 {
			t.Errorf("%v --help: exit %d", c, code)
		}
		if out, code := run(c...); code != 2 || strings.Count(out, "\n") > 0 && !strings.HasPrefix(out, "Usage") {
			t.Errorf("%v with nothing: exit %d (want 2, one line):\n%s", c, code, out)
		}
	}
	for _, tc := range []struct {
		args []string
		flag string
	}{
		{[]string{"backend", "--dir", filepath.Join(dir, "b"), "--master-key-file", filepath.Join(dir, "key"), "--client-ca", filepath.Join(dir, "ca.pem"),
			"--acl", filepath.Join(dir, "acl.json"), "--cipher", "aes-128-gcm", "--listen", "tcp:127.0.0.1:0"}, "--cipher"},
		{[]string{"backend", "--dir", filepath.Join(dir, "b"), "--master-key-file", filepath.Join(dir, "key"), "--client-ca", filepath.Join(dir, "key"),
			"--acl", filepath.Join(dir, "acl.json")}, "--client-ca"},
		{[]string{"ca", "--dir", filepath.Join(dir, "ca"), "--policy", filepath.Join(dir, "nonexistent.json")}, "policy"},
		{[]string{"verifier", "--log-format", "yaml", "--ek-root", filepath.Join(dir, "ca.pem"), "--ak-root", filepath.Join(dir, "ca.pem"),
			"--no-crl", "--policy", filepath.Join(dir, "acl.json"), "--token-key", filepath.Join(dir, "v.key")}, "--log-format"},
		{[]string{"frontend", "--vm", "vm1=" + filepath.Join(dir, "c"), "--socket-mode", "999"}, "--socket-mode"},
		// Renamed flags keep their old names for scripts: --key-file here.
		{[]string{"backend", "--dir", filepath.Join(dir, "b"), "--key-file", filepath.Join(dir, "key"), "--client-ca", filepath.Join(dir, "ca.pem"),
			"--acl", filepath.Join(dir, "acl.json"), "--cipher", "aes-128-gcm", "--listen", "tcp:127.0.0.1:0"}, "--cipher"},
		{[]string{"csv", "simulate", "--out", filepath.Join(dir, "sim"), "--policy", "zz"}, "--policy"},
		{[]string{"enroll", "--instance", "x", "--tpm-socket", filepath.Join(dir, "none.sock")}, "--csv-sim"},
	} {
		out, code := run(tc.args...)
		if code != 1 && code != 2 || strings.Count(out, "\n") > 0 || !strings.Contains(out, tc.flag) {
			t.Errorf("%v: exit %d, want 1 or 2 and one line naming %s:\n%s", tc.args, code, tc.flag, out)
		}
	}
}

// The README's command lines stay true: every flag an example of
// `bin/cvtpm SUBCOMMAND ...` (continuation lines included) names is one
// that subcommand's --help lists. (The examples run for real in the demo
// and the tests; this catches a README left behind by a renamed flag.)
func TestREADMEFlags(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	bin := testenv.Binary(t, testenv.Cvtpm)
	var cmdLines []string
	lines := strings.Split(string(readme), "\n")
	for i := 0; i < len(lines); i++ {
		l := strings.TrimSpace(lines[i])
		if !strings.HasPrefix(lines[i], "    bin/cvtpm ") {
			continue
		}
		for strings.HasSuffix(l, "\\") && i+1 < len(lines) {
			i++
			l = strings.TrimSuffix(l, "\\") + " " + strings.TrimSpace(lines[i])
		}
		if c, _, ok := strings.Cut(l, "#"); ok {
			l = c
		}
		cmdLines = append(cmdLines, l)
	}
	if len(cmdLines) < 20 {
		t.Fatalf("found only %d command lines in the README", len(cmdLines))
	}
	flagRE := regexp.MustCompile(`(?:^|[\s\[|])(--[a-z][a-z0-9-]*)`)
	helps := map[string]string{}
	for _, l := range cmdLines {
		words := strings.Fields(strings.TrimPrefix(l, "bin/cvtpm "))
		sub := []string{words[0]}
		if len(words) > 1 && !strings.HasPrefix(words[1], "-") && regexp.MustCompile(`^[a-z]+$`).MatchString(words[1]) {
			sub = append(sub, words[1]) // ca revoke, backend create, guest proxy, ...
		}
		key := strings.Join(sub, " ")
		if _, ok := helps[key]; !ok {
			out, _ := exec.Command(bin, append(slices.Clone(sub), "--help")...).CombinedOutput() // help goes to stderr
			helps[key] = string(out)
		}
		for _, m := range flagRE.FindAllStringSubmatch(l, -1) {
			if !strings.Contains(helps[key], "-"+strings.TrimPrefix(m[1], "--")) {
				t.Errorf("README: %q uses %s, which 'cvtpm %s --help' does not list", l, m[1], key)
			}
		}
	}
}

// One daemon per directory: a second CA or backend given a directory in
// use stops, exit 1, naming the directory and the holder's PID (before:
// the CA waited 5 s on its database and said "timeout").
func TestDirectoryInUse(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	f := testenv.NewTopologyFiles(t, 0x7)
	c := startCAProc(t, filepath.Join(f.Dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, "hsk_cek.cert"))
	topo := testenv.StartBackend(t, f)
	for _, tc := range []struct {
		what string
		pid  int
		args []string
	}{
		{"CA directory " + c.Dir, c.Cmd.Process.Pid, []string{"ca", "--dir", c.Dir, "--policy", f.Policy, "--hsk-cek", filepath.Join(f.SimDir, "hsk_cek.cert"),
			"--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"}},
		{"backend directory " + topo.StateDir, topo.Backend.Cmd.Process.Pid, []string{"backend", "--dir", topo.StateDir, "--master-key-file", f.MasterKey,
			"--client-ca", f.ClientCA, "--acl", f.ACL, "--csv-sim", f.SimDir, "--listen", "tcp:127.0.0.1:0"}},
	} {
		out, code, timedOut := runBriefly(bin, tc.args, 10*time.Second)
		want := fmt.Sprintf("%s is in use by PID %d", tc.what, tc.pid)
		if timedOut || code != 1 || !strings.Contains(out, want) {
			t.Errorf("second %s: exit %d (still running: %v), want 1 saying %q:\n%s", tc.args[0], code, timedOut, want, out)
		}
	}
}
