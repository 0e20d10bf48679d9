package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/test/testenv"
)

// The repository stands alone: a clone in an empty directory (no
// workspace's shared directory beside it, nothing outside the clone)
// builds and passes the tests that once read HYGON's test vectors from
// outside the project, and no tracked file refers to that directory.
func TestStandaloneClone(t *testing.T) {
	root := testenv.RepoRoot()
	if _, err := os.Stat(filepath.Join(root, ".git")); err != nil {
		t.Skip("not a git checkout: nothing to clone")
	}
	git := testenv.Tool(t, "git")
	outside := "../" + "shared" // spelt so that this file does not match itself
	if out, err := exec.Command(git, "-C", root, "grep", "-n", "-F", "-e", outside).CombinedOutput(); err == nil {
		t.Errorf("tracked files refer to %s:\n%s", outside, out)
	}
	dir := filepath.Join(t.TempDir(), "cvtpm")
	if out, err := exec.Command(git, "clone", "-q", root, dir).CombinedOutput(); err != nil {
		t.Fatalf("git clone: %v\n%s", err, out)
	}
	cmd := exec.Command("go", "test", "-count=1", "./attest/csv/...", "./cmd/cvtpm/")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go test in a fresh clone (%s): %v\n%s", dir, err, out)
	}
	if !strings.Contains(string(out), "ok  \tcvtpm/attest/csv") {
		t.Fatalf("the CSV tests did not run in the clone:\n%s", out)
	}
	t.Logf("in a fresh clone:\n%s", out)
}
