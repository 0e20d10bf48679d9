package test

// Review s33: the drop-in's Landlock step (a C constructor, before Go
// starts) and its descriptor closing, from the real binary.

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// A wrapper as a container runtime's or service manager's seccomp profile
// that predates Landlock makes it: landlock_* fail with EPERM (Docker's
// and containerd's profiles before 2022, systemd's SystemCallFilter=
// without @sandbox), everything else is allowed. It then execs the rest
// of its arguments.
func init() {
	if os.Getenv("REVIEW_S33_EPERM_LANDLOCK") == "" {
		return
	}
	prog, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 0, Size: 4}, // nr
		bpf.JumpIf{Cond: bpf.JumpLessThan, Val: 444, SkipTrue: 2},
		bpf.JumpIf{Cond: bpf.JumpGreaterThan, Val: 446, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
	})
	if err != nil {
		panic(err)
	}
	sf := make([]unix.SockFilter, len(prog))
	for i, in := range prog {
		sf[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(sf)), Filter: &sf[0]}
	unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
	if _, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog))); e != 0 {
		os.Stderr.WriteString("seccomp: " + e.Error() + "\n")
		os.Exit(2)
	}
	args := os.Args[1:]
	err = syscall.Exec(args[0], args, os.Environ())
	os.Stderr.WriteString("exec: " + err.Error() + "\n")
	os.Exit(2)
}

// reviewS33Start runs bin/cvtpm-swtpm socket (behind wrapper, if any)
// with stateDir and extra, and returns once a TPM command was answered,
// or the process's error and log if it ended or did not answer.
func reviewS33Start(t *testing.T, wrapper []string, env []string, stateDir string, extra ...string) (cmd *exec.Cmd, logPath string, err error) {
	t.Helper()
	bin := filepath.Join(filepath.Dir(testenv.Binary(t, testenv.Cvtpm)), "cvtpm-swtpm")
	dir := t.TempDir()
	data := filepath.Join(dir, "data.sock")
	logPath = filepath.Join(dir, "log")
	args := append(append([]string{}, wrapper...), bin, "socket", "--tpm2", "--tpmstate", "dir="+stateDir,
		"--flags", "not-need-init,startup-clear", "--server", "type=unixio,path="+data,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--log", "file="+logPath+",level=20")
	args = append(args, extra...)
	cmd = exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env...)
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case werr := <-done:
			b, _ := os.ReadFile(logPath)
			done <- werr
			return cmd, logPath, &startError{werr, stderr.String() + string(b)}
		default:
		}
		if conn, derr := tpmsock.Dial(context.Background(), "unix", data); derr == nil {
			_, gerr := (tpm2.GetRandom{BytesRequested: 8}).Execute(conn)
			conn.Close()
			if gerr != nil {
				return cmd, logPath, gerr
			}
			return cmd, logPath, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return cmd, logPath, &startError{nil, "no answer in 20 s: " + stderr.String()}
}

type startError struct {
	err error
	out string
}

func (e *startError) Error() string {
	if e.err == nil {
		return e.out
	}
	return e.err.Error() + ": " + e.out
}

// TestReviewS33DuplicateSeccompSkipsLandlock: the constructor skips
// Landlock when any "--seccomp action=none" appears (cvtpm_unconfined
// scans the whole command line), but the Go parser takes the last
// --seccomp. "--seccomp action=none --seccomp action=kill" (a wrapper
// script appending the default, libvirt's swtpm_setup args merged with an
// operator's) serves under the kill filter with /proc and /sys writable:
// /proc/self/mem writes code past the filter's W^X, the very bypass the
// change closes. It logs the wrong cause ("the command line did not begin
// with socket").
func TestReviewS33DuplicateSeccompSkipsLandlock(t *testing.T) {
	cmd, logPath, err := reviewS33Start(t, nil, nil, filepath.Join(t.TempDir(), "state"),
		"--seccomp", "action=none", "--seccomp", "action=kill")
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	seccomp, _ := testenv.ProcStatus(cmd.Process.Pid, "Seccomp")
	b, _ := os.ReadFile(logPath)
	if seccomp == "2" && strings.Contains(string(b), "were not confined at start") {
		t.Errorf("the drop-in serves under --seccomp action=kill (Seccomp: %s) without the Landlock step: the constructor read the first --seccomp (none), Go the last (kill); /proc/self/mem stays writable under the filter. Log:\n%s", seccomp, b)
	}
}

// TestReviewS33StateDirDirectlyUnderRoot: Landlock allows writes beneath
// the entries / had when the constructor ran. A state directory the
// drop-in would create itself directly in / (serveSocket's MkdirAll;
// swtpm users pass paths such as /tpm or /vtpm-state in containers) is
// not beneath any of them: the review found the start failing with a
// bare EACCES on the lock file. The drop-in now refuses such a path at
// once, saying why and what to do; an existing directory in / is served.
func TestReviewS33StateDirDirectlyUnderRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs to create a directory in /")
	}
	state := "/review-s33-state-" + strconv.Itoa(os.Getpid())
	os.RemoveAll(state)
	t.Cleanup(func() { os.RemoveAll(state) })
	_, _, err := reviewS33Start(t, nil, nil, state)
	if err == nil || !strings.Contains(err.Error(), "cannot be created directly in /") {
		t.Errorf("--tpmstate dir=%s (new, directly in /): want a refusal that says it cannot be created directly in /, got %v", state, err)
	}
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, _, err := reviewS33Start(t, nil, nil, state); err != nil {
		t.Errorf("--tpmstate dir=%s (existing, directly in /) is not served: %v", state, err)
	}
}

// TestReviewS33LandlockEPERMFailsStart: a kernel without Landlock
// (ENOSYS, EOPNOTSUPP) is logged and served; a seccomp profile that
// predates Landlock and answers EPERM (the parent's, inherited) makes
// every start fail, where swtpm, and cvtpm before this change, served.
func TestReviewS33LandlockEPERMFailsStart(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = reviewS33Start(t, []string{self}, []string{"REVIEW_S33_EPERM_LANDLOCK=1"}, filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Errorf("under a parent's seccomp profile that refuses landlock_* with EPERM, the drop-in does not start (a kernel without Landlock would be served with an error logged): %v", err)
	}
}
