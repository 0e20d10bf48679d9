package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"cvtpm/test/testenv"
)

// TestDropInCreatesOnlyWhatItServes: the drop-in's constructor creates a
// missing state directory, pid file and log file so that its Landlock
// rules can name them (internal/confine), but only for a process that
// will serve: a query (swtpm_setup's --print-states, --print-capabilities)
// leaves the file system as it found it. A served start on a state
// directory two levels below an existing one works.
func TestDropInCreatesOnlyWhatItServes(t *testing.T) {
	bin := testenv.Binary(t, testenv.Cvtpm)
	root := t.TempDir()
	state, pid, logf := filepath.Join(root, "a", "b"), filepath.Join(root, "p.pid"), filepath.Join(root, "l.log")
	for _, query := range []string{"--print-states", "--print-capabilities"} {
		out, err := exec.Command(bin, "socket", "--tpm2", query, "--tpmstate", "dir="+state,
			"--pid", "file="+pid, "--log", "file="+logf).CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", query, err, out)
		}
		for _, p := range []string{filepath.Join(root, "a"), pid, logf} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s created %s", query, p)
			}
		}
	}
	testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: state, ExtraArgs: []string{"--pid", "file=" + pid}})
	for _, p := range []string{filepath.Join(state, ".lock"), pid} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("serving: %v", err)
		}
	}
}
