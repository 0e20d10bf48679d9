package test

// Review s34 of --runas (commit 0b1efc3). Each test fails on that commit
// and passes once the gap it names is closed.

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// s34Setpriv wraps the prepared command in setpriv(1) with args, so that
// the server starts with the identity, capabilities or securebits a
// service manager (systemd's AmbientCapabilities=, SecureBits=) could give
// it.
func s34Setpriv(t *testing.T, args ...string) func(*exec.Cmd) error {
	t.Helper()
	setpriv := testenv.Tool(t, "setpriv")
	return func(cmd *exec.Cmd) error {
		cmd.Args = append(append([]string{setpriv}, args...), cmd.Args...)
		cmd.Path = setpriv
		return cmd.Start()
	}
}

// s34NoCapsLeft fails the test when the process holds any capability
// (effective, permitted, ambient or inheritable) after --runas, or when it
// started at all without a refusal that names capabilities.
func s34NoCapsLeft(t *testing.T, impl testenv.Impl, start func(*exec.Cmd) error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv, err := testenv.Launch(ctx, impl, testenv.Binary(t, impl), testenv.Options{StateDir: runAsStateDir(t), RunAs: "nobody", Start: start})
	if err != nil {
		// Refusing to start is a fix too, if it says why.
		if !strings.Contains(strings.ToLower(err.Error()), "capabilit") && !strings.Contains(strings.ToLower(err.Error()), "securebits") {
			t.Fatalf("did not start, and not for its capabilities: %v", err)
		}
		return
	}
	defer srv.Close()
	pid := srv.Cmd.Process.Pid
	uid, _ := testenv.ProcStatus(pid, "Uid")
	if uid != "65534\t65534\t65534\t65534" {
		t.Errorf("Uid %q: not nobody's", uid)
	}
	for _, f := range []string{"CapEff", "CapPrm", "CapAmb", "CapInh"} {
		v, err := testenv.ProcStatus(pid, f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Trim(v, "0") != "" {
			t.Errorf("%s %s after --runas nobody: capabilities left (README: \"no capability left\")", f, v)
		}
	}
}

// TestReviewS34RunAsSecurebitsNoSetuidFixup: root with SECBIT_NO_SETUID_FIXUP
// (inherited across exec; systemd's SecureBits=no-setuid-fixup) stays with
// every capability after --runas nobody: the kernel only clears them on
// setuid when that bit is off, and runAs neither drops them itself nor
// checks (checkThreadsRunAs looks at the ids only). The process is
// "nobody" with CAP_DAC_OVERRIDE etc.: it can open any file (openat is in
// the seccomp allow-list).
func TestReviewS34RunAsSecurebitsNoSetuidFixup(t *testing.T) {
	needRootAndNobody(t)
	s34NoCapsLeft(t, testenv.Cvtpm, s34Setpriv(t, "--securebits", "+no_setuid_fixup"))
}

// TestReviewS34RunAsAmbientCapsKept: a caller that is not root but holds
// CAP_SETUID and CAP_SETGID (ambient, as systemd's AmbientCapabilities=
// gives them; here with CAP_DAC_OVERRIDE too) can use --runas; the kernel
// does not clear capabilities on a change between two non-root uids, so
// the drop-in serves as nobody with all three.
func TestReviewS34RunAsAmbientCapsKept(t *testing.T) {
	needRootAndNobody(t)
	caps := "+setuid,+setgid,+dac_override"
	s34NoCapsLeft(t, testenv.Cvtpm, s34Setpriv(t, "--reuid", "12346", "--regid", "12346", "--clear-groups",
		"--inh-caps", caps, "--ambient-caps", caps))
}

// TestReviewS34RunAsInheritableCapsKept: root's inheritable set survives
// setuid (the kernel clears only permitted, effective and ambient).
func TestReviewS34RunAsInheritableCapsKept(t *testing.T) {
	needRootAndNobody(t)
	s34NoCapsLeft(t, testenv.Cvtpm, s34Setpriv(t, "--inh-caps", "+dac_override,+sys_admin"))
}

// TestReviewS34PrintStatesRunAsUnreadable: --print-states --runas nobody on
// a state directory nobody may not enter, which holds a TPM's state. swtpm
// fails (it cannot lock the directory); the drop-in prints an empty list
// and exits 0, telling swtpm_setup (--not-overwrite) and libvirt there is
// no state when there is one: printStates takes any stat error, EACCES
// included, for "absent".
func TestReviewS34PrintStatesRunAsUnreadable(t *testing.T) {
	needRootAndNobody(t)
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			dir := runAsStateDir(t)
			if err := os.Chmod(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), []byte("state"), 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, testenv.Binary(t, impl), "socket", "--print-states",
				"--tpmstate", "dir="+dir, "--runas", "nobody").CombinedOutput()
			if err == nil && !strings.Contains(string(out), "permall") {
				t.Errorf("exit 0 with %q: the directory holds tpm2-00.permall, which nobody cannot see; want an error (as swtpm) or the real list", strings.TrimSpace(string(out)))
			}
		})
	}
}

// TestReviewS34RunAsSignedNumber: swtpm reads --runas with strtoul, so
// "+65534" is uid 65534 (gid 65534); the drop-in looks it up as a name
// and refuses to start. (A leading blank, " 65534", is the same.)
func TestReviewS34RunAsSignedNumber(t *testing.T) {
	needRootAndNobody(t)
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			srv := testenv.StartSocket(t, impl, testenv.Options{StateDir: runAsStateDir(t), RunAs: "+65534"})
			if uid, _ := testenv.ProcStatus(srv.Cmd.Process.Pid, "Uid"); uid != "65534\t65534\t65534\t65534" {
				t.Errorf("Uid %q; want 65534", uid)
			}
		})
	}
}

// TestReviewS34RunAsShortOptionJoined: swtpm (getopt) takes -r's value
// joined to it, "-rnobody"; the drop-in refuses the argument, saying
// options start with "--" although it knows -r.
func TestReviewS34RunAsShortOptionJoined(t *testing.T) {
	needRootAndNobody(t)
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			dir := runAsStateDir(t)
			if err := os.Chown(dir, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			ctrl := filepath.Join(dir, "ctrl")
			cmd := exec.Command(testenv.Binary(t, impl), "socket", "--tpm2", "--tpmstate", "dir="+dir,
				"--ctrl", "type=unixio,path="+ctrl, "--flags", "not-need-init,startup-clear", "-rnobody")
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- cmd.Wait() }()
			defer func() { cmd.Process.Kill(); <-done }()
			deadline := time.Now().Add(10 * time.Second)
			for {
				if fi, err := os.Stat(ctrl); err == nil && fi.Mode()&os.ModeSocket != 0 {
					break
				}
				select {
				case err := <-done:
					done <- err
					t.Fatalf("-rnobody: exited (%v): %s", err, out.String())
				case <-time.After(10 * time.Millisecond):
				}
				if time.Now().After(deadline) {
					t.Fatalf("-rnobody: no control socket: %s", out.String())
				}
			}
			if uid, _ := testenv.ProcStatus(cmd.Process.Pid, "Uid"); uid != "65534\t65534\t65534\t65534" {
				t.Errorf("Uid %q; want nobody's", uid)
			}
		})
	}
}

// TestReviewS34RunAsSecurebitsLocked: the same bit locked, which the
// drop-in cannot clear: it must refuse, naming capabilities, rather than
// serve as nobody with root's capabilities.
func TestReviewS34RunAsSecurebitsLocked(t *testing.T) {
	needRootAndNobody(t)
	s34NoCapsLeft(t, testenv.Cvtpm, s34Setpriv(t, "--securebits", "+no_setuid_fixup,+no_setuid_fixup_locked"))
}
