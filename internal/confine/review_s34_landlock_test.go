package confine

// Review s34 of the drop-in's second Landlock layer
// (cvtpm_writes_only_where_named, uncommitted change). Each test runs the
// test binary as "<bin> socket ..." so the constructor confines it as it
// confines cvtpm-swtpm, then tries writes a taken-over drop-in would try.
// Each fails on the change as reviewed and passes once the gap it names
// is closed.

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The child: REVIEW_S34_LL_CHILD is a list of "op path" lines; it prints
// "op path: ok" or "op path: <error>" for each, after checking that the
// constructor reported success. Checked in init, before TestMain.
func init() {
	ops := os.Getenv("REVIEW_S34_LL_CHILD")
	if ops == "" {
		return
	}
	if ok, err := DropInLandlock(); !ok || err != nil {
		fmt.Printf("landlock: ok=%v %v\n", ok, err)
		os.Exit(3)
	}
	if DropInStateDirMissing() { // the drop-in refuses to start (swtpmsocket)
		fmt.Println("refused: the state directory does not exist")
		os.Exit(3)
	}
	for _, line := range strings.Split(ops, "\n") {
		op, p, _ := strings.Cut(line, " ")
		var err error
		switch op {
		case "create":
			err = os.WriteFile(p, []byte("x"), 0o600)
		case "append":
			var f *os.File
			if f, err = os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0); err == nil {
				_, err = f.WriteString("taken over\n")
				f.Close()
			}
		case "remove":
			err = os.Remove(p)
		case "mkdir":
			err = os.Mkdir(p, 0o700)
		case "rename": // "rename FROM|TO"
			from, to, _ := strings.Cut(p, "|")
			err = os.Rename(from, to)
		}
		if err != nil {
			fmt.Printf("%s %s: %v\n", op, p, err)
		} else {
			fmt.Printf("%s %s: ok\n", op, p)
		}
	}
	os.Exit(0)
}

// reviewS34Run starts the child with the drop-in arguments args (after
// "socket"), in dir, with env added, doing ops; it returns each op's
// result. A constructor that refused (the start would fail) returns nil.
func reviewS34Run(t *testing.T, dir string, env []string, args []string, ops ...string) map[string]string {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"socket"}, args...)...)
	cmd.Dir = dir
	cmd.Env = append(append(os.Environ(), env...), "REVIEW_S34_LL_CHILD="+strings.Join(ops, "\n"))
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 3 {
		if strings.Contains(string(out), "not available") {
			t.Skipf("no Landlock here: %s", out)
		}
		t.Logf("the constructor refused (the drop-in would not start): %s", out)
		return nil
	}
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	return childResults(out)
}

func reviewS34Tree(t *testing.T, dirs ...string) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func reviewS34Denied(t *testing.T, got map[string]string, what, why string) {
	t.Helper()
	if got == nil {
		return // refused at start: acceptable
	}
	if !strings.HasSuffix(got[what], "permission denied") {
		t.Errorf("%s: %q, want permission denied: %s", what, got[what], why)
	}
}

// swtpm_setup 0.7.1 starts "swtpm socket" with "--tpmstate
// backend-uri=dir://DIR" (strings /usr/bin/swtpm_setup), which the Go
// parser takes as the state directory; the constructor looks only for
// dir= and so names no state directory: the drop-in cannot create its
// lock file there ("locking state directory: open DIR/.lock: permission
// denied"), unless DIR happens to lie beneath the pid file's directory
// (swtpm_setup's pid file is in /tmp, which is why
// TestSwtpmSetupThroughSymlink, with its state in t.TempDir, still passes).
func TestReviewS34BackendURIStateDirIsWritable(t *testing.T) {
	root := reviewS34Tree(t, "state", "run")
	state := filepath.Join(root, "state")
	got := reviewS34Run(t, root, nil, []string{"--tpm2", "--flags", "not-need-init,startup-clear",
		"--tpmstate", "backend-uri=dir://" + state, "--server", "type=unixio,path=" + filepath.Join(root, "run", "s"),
		"--ctrl", "type=unixio,path=" + filepath.Join(root, "run", "c")},
		"create "+filepath.Join(state, ".lock"))
	if got == nil {
		t.Fatal("the constructor refused a command line swtpm_setup uses")
	}
	if r := got["create "+filepath.Join(state, ".lock")]; r != "ok" {
		t.Errorf("creating the state directory's lock file with --tpmstate backend-uri=dir://: %q, want ok", r)
	}
}

// A state directory that does not exist yet (the first start of a new
// instance: serveSocket creates it with MkdirAll) has the rule land on its
// nearest existing ancestor, with every right, for the life of the
// process: there, the directory that holds every instance's state.
func TestReviewS34NewStateDirDoesNotOpenOtherInstances(t *testing.T) {
	root := reviewS34Tree(t, "vms/vm2/tpm", "run")
	other := filepath.Join(root, "vms", "vm2", "tpm", "tpm2-00.permall")
	if err := os.WriteFile(other, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := reviewS34Run(t, root, nil, []string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(root, "vms", "vm1", "tpm"),
		"--server", "type=unixio,path=" + filepath.Join(root, "run", "s"), "--ctrl", "type=unixio,path=" + filepath.Join(root, "run", "c")},
		"append "+other, "remove "+other)
	reviewS34Denied(t, got, "append "+other, "another instance's state, writable because this one's state directory did not exist yet")
	reviewS34Denied(t, got, "remove "+other, "another instance's state")
}

// A state directory whose every ancestor but / is missing (a typo, or a
// new top-level directory) puts the rule on /: every file its user may
// write is writable again, and the drop-in serves without a word.
func TestReviewS34MissingTopLevelStateDirIsNotUnconfined(t *testing.T) {
	root := reviewS34Tree(t, "elsewhere", "run")
	victim := filepath.Join(root, "elsewhere", "file")
	if err := os.WriteFile(victim, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	var b [8]byte
	rand.Read(b[:])
	missing := "/cvtpm-review-s34-" + hex.EncodeToString(b[:]) + "/vm1/tpm"
	got := reviewS34Run(t, root, nil, []string{"--tpm2", "--tpmstate", "dir=" + missing,
		"--server", "type=unixio,path=" + filepath.Join(root, "run", "s"), "--ctrl", "type=unixio,path=" + filepath.Join(root, "run", "c")},
		"append "+victim)
	reviewS34Denied(t, got, "append "+victim, "the rule for "+missing+" landed on /")
}

// "--tpmstate dir=" (empty) is ignored by the Go parser, which then takes
// TPM_PATH; the constructor takes the empty value, finds no such path and
// climbs to ".": every right beneath the working directory, and none for
// TPM_PATH (so the drop-in serves only because TPM_PATH lies beneath it).
func TestReviewS34EmptyStateDirDoesNotOpenWorkingDir(t *testing.T) {
	root := reviewS34Tree(t, "state", "elsewhere", "run")
	victim := filepath.Join(root, "elsewhere", "file")
	if err := os.WriteFile(victim, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := reviewS34Run(t, root, []string{"TPM_PATH=" + filepath.Join(root, "state")}, []string{"--tpm2", "--tpmstate", "dir=",
		"--server", "type=unixio,path=" + filepath.Join(root, "run", "s"), "--ctrl", "type=unixio,path=" + filepath.Join(root, "run", "c")},
		"append "+victim, "create "+filepath.Join(root, "state", "x"))
	reviewS34Denied(t, got, "append "+victim, "\"dir=\" put the rule on the working directory")
	if got != nil && got["create "+filepath.Join(root, "state", "x")] != "ok" {
		t.Errorf("TPM_PATH, the state directory Go uses with an empty dir=, is not writable: %q", got["create "+filepath.Join(root, "state", "x")])
	}
}

// swtpm's "--key file=K,remove" (remove[=true|false]: the bare form means
// true, as paramBool reads it) gets no rule: the constructor looks for
// "remove=" only, so the drop-in fails to start ("removing key file:
// permission denied"). And remove=no or remove=0 (false to Go) gets one.
func TestReviewS34KeyRemoveSpelledAsSwtpmDoes(t *testing.T) {
	root := reviewS34Tree(t, "state", "keys", "other", "run")
	key := filepath.Join(root, "keys", "k")
	if err := os.WriteFile(key, []byte(strings.Repeat("ab", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	run := filepath.Join(root, "run")
	base := []string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(root, "state"),
		"--server", "type=unixio,path=" + filepath.Join(run, "s"), "--ctrl", "type=unixio,path=" + filepath.Join(run, "c")}
	got := reviewS34Run(t, root, nil, append(base, "--key", "file="+key+",remove"), "remove "+key)
	if got != nil && got["remove "+key] != "ok" {
		t.Errorf("--key file=K,remove: removing K: %q, want ok (the drop-in removes it and fails to start otherwise)", got["remove "+key])
	}
	second := filepath.Join(root, "keys", "other-key")
	os.WriteFile(second, []byte("kept"), 0o600)
	os.WriteFile(key, []byte(strings.Repeat("ab", 32)), 0o600)
	got = reviewS34Run(t, root, nil, append(base, "--key", "file="+key+",remove=no"), "remove "+second)
	reviewS34Denied(t, got, "remove "+second, "remove=no is false to Go, yet the key's directory got REMOVE_FILE")
}

// The pid file's directory gets creating, writing, truncating and
// removing files beneath it, which is every file in every directory under
// it: a pid file in a directory that holds other instances (or /tmp, as
// swtpm_setup's does, or /run) opens them all.
func TestReviewS34PidFileDirDoesNotOpenSubtree(t *testing.T) {
	root := reviewS34Tree(t, "state", "vms/vm2/tpm")
	other := filepath.Join(root, "vms", "vm2", "tpm", "tpm2-00.permall")
	if err := os.WriteFile(other, []byte("kept"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := reviewS34Run(t, root, nil, []string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(root, "state"),
		"--server", "type=unixio,path=" + filepath.Join(root, "state", "s"), "--ctrl", "type=unixio,path=" + filepath.Join(root, "state", "c"),
		"--pid", "file=" + filepath.Join(root, "vms", "vm1.pid")},
		"create "+filepath.Join(root, "vms", "vm1.pid"), "append "+other)
	if got != nil && got["create "+filepath.Join(root, "vms", "vm1.pid")] != "ok" {
		t.Errorf("creating the pid file: %q", got["create "+filepath.Join(root, "vms", "vm1.pid")])
	}
	reviewS34Denied(t, got, "append "+other, "another instance's state beneath the pid file's directory")
}
