package test

// Review s32: the drop-in's closing of inherited descriptors and its W^X
// filter, as the operator gets them from the real binaries.

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// As libvirt's virCommandDaemonize with virCommandSetPidFile does: the
// process that execs swtpm takes a POSIX write lock on the pid file
// (virPidFileAcquirePath), writes its pid there and passes the locked
// descriptor on through exec (virSetInherit), so that the pid file stays
// locked for as long as swtpm runs; libvirt then reads the pid only from
// a locked pid file (virPidFileReadPathIfLocked, in
// qemuExtTPMEmulatorSetupCgroup).
func init() {
	pidfile := os.Getenv("REVIEW_S32_LOCKED_PIDFILE")
	if pidfile == "" {
		return
	}
	fd, err := syscall.Open(pidfile, syscall.O_RDWR|syscall.O_CREAT, 0o644)
	if err == nil {
		err = syscall.FcntlFlock(uintptr(fd), syscall.F_SETLK, &syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: 0, Len: 1})
	}
	if err == nil {
		_, err = syscall.Write(fd, []byte(strconv.Itoa(os.Getpid())))
	}
	if err != nil {
		os.Stderr.WriteString("pid file: " + err.Error() + "\n")
		os.Exit(2)
	}
	syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_SETFD, 0)
	args := os.Args[1:]
	err = syscall.Exec(args[0], args, os.Environ())
	os.Stderr.WriteString("exec: " + err.Error() + "\n")
	os.Exit(2)
}

// reviewS32Start runs bin/cvtpm-swtpm socket behind wrapper (a command
// that execs the rest of its arguments), with stray as fd 3 (named by no
// option) and --pid fd=4, waits for the pid and a TPM answer, and returns
// the process and its stderr.
func reviewS32Start(t *testing.T, wrapper []string, stray *os.File, env ...string) (*exec.Cmd, *strings.Builder) {
	t.Helper()
	bin := filepath.Join(filepath.Dir(testenv.Binary(t, testenv.Cvtpm)), "cvtpm-swtpm")
	dir := t.TempDir()
	pidR, pidW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pidR.Close()
	data := filepath.Join(dir, "data.sock")
	args := append(append([]string{}, wrapper...), bin, "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--flags", "not-need-init,startup-clear", "--server", "type=unixio,path="+data,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--pid", "fd=4")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = append(os.Environ(), env...)
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	cmd.ExtraFiles = []*os.File{stray, pidW}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pidW.Close()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	pidCh := make(chan string, 1)
	go func() { b, _ := io.ReadAll(pidR); pidCh <- string(b) }()
	select {
	case got := <-pidCh:
		if got != strconv.Itoa(cmd.Process.Pid) {
			t.Fatalf("--pid fd=4 gave %q, want %d\n%s", got, cmd.Process.Pid, stderr)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no pid through --pid fd=4\n%s", stderr)
	}
	conn, err := tpmsock.Dial(context.Background(), "unix", data)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(conn); err != nil {
		t.Fatalf("GetRandom: %v", err)
	}
	if s, _ := testenv.ProcStatus(cmd.Process.Pid, "Seccomp"); s != "2" {
		t.Fatalf("Seccomp: %q, want 2 (the default filter)", s)
	}
	return cmd, stderr
}

// TestReviewS32DropInLowFdLimitKeepsInherited: the record of inherited
// descriptors is an open() of /proc/self/fd in a C constructor. Started
// with a soft RLIMIT_NOFILE its inherited descriptors already fill (a
// service manager's or a shell's limit; prlimit here), that open fails
// with EMFILE. The review found the drop-in then serving, filter on,
// with every inherited descriptor open and nothing said above Warn. Now
// it refuses to start, saying why, and never serves with them.
func TestReviewS32DropInLowFdLimitKeepsInherited(t *testing.T) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	strayR, strayW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer strayR.Close()
	bin := filepath.Join(filepath.Dir(testenv.Binary(t, testenv.Cvtpm)), "cvtpm-swtpm")
	dir := t.TempDir()
	// 0, 1, 2, 3 (stray), 4 (--pid): the soft limit 5 leaves no room.
	pidR, pidW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pidR.Close()
	cmd := exec.Command("prlimit", "--nofile=5:"+strconv.FormatUint(lim.Max, 10), "--", bin, "socket", "--tpm2",
		"--tpmstate", "dir="+filepath.Join(dir, "state"), "--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+filepath.Join(dir, "data.sock"), "--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--pid", "fd=4")
	stderr := &strings.Builder{}
	cmd.Stderr = stderr
	cmd.ExtraFiles = []*os.File{strayW, pidW}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	strayW.Close()
	pidW.Close()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(stderr.String(), "listing the descriptors the process inherited") || !strings.Contains(stderr.String(), "too many open files") {
			t.Errorf("want a failed start that names the unreadable list of inherited descriptors; got %v, stderr %q", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the drop-in serves though it could not tell its inherited descriptors; stderr %q", stderr.String())
	}
	if b, _ := io.ReadAll(pidR); len(b) != 0 {
		t.Errorf("the drop-in wrote its pid (%q): it got as far as serving", b)
	}
}

// TestReviewS32DropInKeepsLibvirtPidFileLock: libvirt starts swtpm
// daemonized with a pid file that the exec'ing process locked and passed
// on (see init above); "libvirt passes none" does not hold. The drop-in
// closes that descriptor as one no option names, the lock goes, and
// libvirt fails the domain's start with "Could not get process id of
// swtpm" (TestLibvirtDomain fails so). Here: the lock, held by the drop-in
// before it serves, is gone once it serves.
func TestReviewS32DropInKeepsLibvirtPidFileLock(t *testing.T) {
	pidfile := filepath.Join(t.TempDir(), "swtpm.pid")
	devnullR, devnull, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer devnullR.Close()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd, stderr := reviewS32Start(t, []string{self}, devnull, "REVIEW_S32_LOCKED_PIDFILE="+pidfile)
	devnull.Close()
	f, err := os.OpenFile(pidfile, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := syscall.Flock_t{Type: syscall.F_WRLCK, Whence: 0, Start: 0, Len: 1}
	if err := syscall.FcntlFlock(f.Fd(), syscall.F_GETLK, &lk); err != nil {
		t.Fatal(err)
	}
	if lk.Type == syscall.F_UNLCK || int(lk.Pid) != cmd.Process.Pid {
		t.Errorf("the pid file libvirt locked for swtpm is no longer locked by the serving drop-in (F_GETLK: type %d, pid %d; drop-in %d): libvirt's virPidFileReadPathIfLocked finds no pid; stderr %q",
			lk.Type, lk.Pid, cmd.Process.Pid, stderr.String())
	}
}
