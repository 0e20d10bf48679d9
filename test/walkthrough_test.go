package test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// The README's step-by-step block runs as written: extracted between its
// markers and given to bash (-e: any failing command fails the test) in
// the repository, with the binaries of `make build` in bin/.
func TestREADMEWalkthrough(t *testing.T) {
	root := testenv.RepoRoot()
	readme, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(readme), "<!-- walkthrough: begin -->\n```sh\n")
	script, _, ok2 := strings.Cut(rest, "```\n<!-- walkthrough: end -->")
	if !ok || !ok2 {
		t.Fatal("README.md has no walkthrough block between its markers")
	}
	if _, err := os.Stat(filepath.Join(root, "bin", "cvtpm")); err != nil {
		t.Fatalf("bin/cvtpm: %v (run 'make build')", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
	cmd.Dir = root
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// Whatever the script left behind goes with its process group.
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	out, err := cmd.CombinedOutput()
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if err != nil {
		t.Fatalf("the README's walkthrough failed: %v\n%s", err, out)
	}
	for _, want := range []string{"EK at 0x81010001 certified", "vTPM quote           AFFIRMING", "simulated-csv-evidence"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("the walkthrough's output lacks %q:\n%s", want, out)
		}
	}
}
