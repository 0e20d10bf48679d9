package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

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
