package test

// Review s34 of the drop-in's second Landlock layer (writes only where the
// command line names). Fails on the change as reviewed.

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/test/testenv"
)

// swtpm_setup as libvirt runs it (state in /var/lib/libvirt/swtpm/UUID/
// tpm2, not beneath /tmp) through a `swtpm` symlink to the drop-in.
// swtpm_setup 0.7.1 passes "--tpmstate backend-uri=dir://DIR"; the
// constructor names no state directory for it, and only swtpm_setup's pid
// file in /tmp opens anything: a state directory outside /tmp cannot be
// written ("locking state directory: open DIR/.lock: permission denied"),
// and manufacturing fails. TestSwtpmSetupThroughSymlink keeps its state in
// t.TempDir (beneath /tmp), which is why it still passes.
func TestReviewS34SwtpmSetupStateOutsideTmp(t *testing.T) {
	for _, target := range []string{"cvtpm", "cvtpm-swtpm"} {
		t.Run(target, func(t *testing.T) {
			bin := t.TempDir()
			if err := os.Symlink(filepath.Join(filepath.Dir(testenv.Binary(t, testenv.Cvtpm)), target), filepath.Join(bin, "swtpm")); err != nil {
				t.Fatal(err)
			}
			state, err := os.MkdirTemp("/var/tmp", "cvtpm-review-s34-state")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(state) })
			env := []string{"PATH=" + bin + ":" + os.Getenv("PATH")}
			out, err := testenv.RunErr(env, testenv.Tool(t, "swtpm_setup"), "--tpm2", "--tpmstate", state, "--createek")
			if err != nil || !strings.Contains(out, "Successfully authored TPM state") {
				t.Fatalf("swtpm_setup with its state in %s: %v\n%s", state, err, out)
			}
			if _, err := os.Stat(filepath.Join(state, "cvtpm.permall")); err != nil {
				t.Errorf("no cvtpm state: %v", err)
			}
		})
	}
}
