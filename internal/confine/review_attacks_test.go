package confine

// Review tests (an adversarial review of the worker's confinement, all
// fixed): attacks that a
// worker taken over after confine.Worker (ModeKill) tried to carry out.
// Each runs the attacker in a child (REVIEW_CHILD=<case>, dispatched from
// init, before TestMain) started as a worker (--conn-fd: it drops its
// capabilities and becomes non-dumpable before Go starts, early_linux.go)
// that installs the filter first; an attack the filter stops ends in
// SIGSYS, one the kernel refuses in an error. Each test fails when the
// attack succeeds.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// reviewSecret stands in for the supervisor's keys; reviewFlag for a
// variable whose change is code execution's first step.
var (
	reviewSecret = [32]byte{'S', 'U', 'P', 'E', 'R', 'V', 'I', 'S', 'O', 'R', '-', 'M', 'A', 'S', 'T', 'E', 'R', '-', 'K', 'E', 'Y'}
	reviewFlag   uint64
)

func init() {
	what := os.Getenv("REVIEW_CHILD")
	if what == "" {
		return
	}
	if what == "victim" {
		os.Exit(reviewVictim())
	}
	if what == "spare" {
		os.Exit(reviewSpare())
	}
	if err := Worker(ModeKill); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	fmt.Fprintln(os.Stderr, "calling", what)
	if err := reviewAttack(what); err != nil {
		fmt.Fprintln(os.Stderr, what+":", err)
		os.Exit(2)
	}
	os.Exit(0)
}

// reviewVictim is an unconfined process of the same user made
// non-dumpable as the supervisor makes itself (cvtpm backend): it prints
// where its secret and flag are and exits 0 if someone changes the flag
// within 15 s.
func reviewVictim() int {
	if err := NotDumpable(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	fmt.Printf("%d %d %d\n", os.Getpid(), uintptr(unsafe.Pointer(&reviewSecret)), uintptr(unsafe.Pointer(&reviewFlag)))
	os.Stdout.Sync()
	end := time.Now().Add(15 * time.Second)
	for time.Now().Before(end) {
		if *(*uint64)(unsafe.Pointer(&reviewFlag)) != 0 {
			fmt.Println("flag changed by someone else")
			return 0
		}
		time.Sleep(10 * time.Millisecond)
	}
	return 1
}

// reviewSpare stands in for a spare worker (started with --conn-fd, so
// non-dumpable and without capabilities from its first instruction): it
// waits for a line on stdin (its flags), then copies fd 3 (its key pipe)
// to stdout.
func reviewSpare() int {
	var line string
	fmt.Scanln(&line)
	b, err := io.ReadAll(os.NewFile(3, "key"))
	if err != nil {
		return 2
	}
	os.Stdout.Write(b)
	return 0
}

func envInt(name string) int {
	v, _ := strconv.Atoi(os.Getenv(name))
	return v
}

func reviewAttack(what string) error {
	victim := envInt("REVIEW_VICTIM")
	switch what {
	case "procmem":
		// Same user (root in the shipped unit, which keeps every
		// capability): /proc/<pid>/mem of the supervisor is open to
		// openat + pread64/pwrite64, all on the allow-list.
		secretAt, _ := strconv.ParseUint(os.Getenv("REVIEW_SECRET_AT"), 10, 64)
		flagAt, _ := strconv.ParseUint(os.Getenv("REVIEW_FLAG_AT"), 10, 64)
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/mem", victim), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		buf := make([]byte, 21)
		if _, err := unix.Pread(fd, buf, int64(secretAt)); err != nil {
			return err
		}
		one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
		if _, err := unix.Pwrite(fd, one, int64(flagAt)); err != nil {
			return err
		}
		fmt.Printf("read %q from the victim's memory and wrote its flag\n", buf)
		return nil
	case "setown":
		// fcntl (allowed) makes a pipe's owner another process with
		// SIGKILL as its I/O signal; write (allowed) then has the kernel
		// send it. The kernel checks only that the uids match.
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return err
		}
		if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_SETOWN, victim); err != nil {
			return err
		}
		if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_SETSIG, int(unix.SIGKILL)); err != nil {
			return err
		}
		fl, err := unix.FcntlInt(uintptr(p[0]), unix.F_GETFL, 0)
		if err != nil {
			return err
		}
		if _, err := unix.FcntlInt(uintptr(p[0]), unix.F_SETFL, fl|unix.O_ASYNC); err != nil {
			return err
		}
		_, err = unix.Write(p[1], []byte("x"))
		return err
	case "prlimit":
		// prlimit64 is allowed for any pid, not only 0 (itself).
		lim := unix.Rlimit{Cur: 1, Max: 1}
		return unix.Prlimit(victim, unix.RLIMIT_CPU, &lim, nil)
	case "fork":
		// clone with no thread flags: a new process, which neither the
		// supervisor's Kill of the worker's pid nor Pdeathsig reaches.
		runtime.LockOSThread()
		pid, _, e := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.SIGCHLD), 0, 0, 0, 0, 0)
		if e != 0 {
			return e
		}
		if pid == 0 {
			// the child: raw system calls only; lets go of the
			// output pipes and sleeps 30 s.
			unix.RawSyscall(unix.SYS_CLOSE, 1, 0, 0)
			unix.RawSyscall(unix.SYS_CLOSE, 2, 0, 0)
			ts := unix.Timespec{Sec: 30}
			unix.RawSyscall(unix.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&ts)), 0, 0)
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
		fmt.Printf("%d\n", pid)
		return nil
	case "userns":
		// clone(CLONE_NEWUSER) (any clone flag is allowed): a new user
		// namespace in which the child holds every capability.
		runtime.LockOSThread()
		pid, _, e := unix.RawSyscall6(unix.SYS_CLONE, uintptr(unix.CLONE_NEWUSER|unix.CLONE_NEWNET|unix.CLONE_NEWNS|unix.SIGCHLD), 0, 0, 0, 0, 0)
		if e != 0 {
			return e
		}
		if pid == 0 {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
		fmt.Printf("child %d in a new user, net and mount namespace\n", pid)
		return nil
	case "core_pattern":
		// Root's write access to sysctls: core_pattern "|prog" runs prog
		// as root, outside any filter, on the next crash (the worker's own
		// SIGSYS). Opened for writing only; nothing is written.
		fd, err := unix.Open("/proc/sys/kernel/core_pattern", unix.O_WRONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		unix.Close(fd)
		fmt.Println("/proc/sys/kernel/core_pattern is open for writing")
		return nil
	case "pipe-steal":
		// Another process's pipe, reopened through /proc/<pid>/fd/N
		// (openat, allowed; only PTRACE_MODE_READ is asked, which a
		// process of the same user passes): a spare worker's key pipe.
		fd, err := unix.Open(fmt.Sprintf("/proc/%d/fd/%s", victim, os.Getenv("REVIEW_FD")), unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		fmt.Println("ready")
		os.Stdout.Sync()
		buf := make([]byte, 4096)
		n, err := unix.Read(fd, buf)
		if err != nil {
			return err
		}
		// Put it back: the owner reads it as if nothing happened.
		if _, err := unix.Write(fd, buf[:n]); err != nil {
			return err
		}
		unix.Close(fd)
		fmt.Printf("stole %q\n", buf[:n])
		return nil
	}
	return fmt.Errorf("unknown case %q", what)
}

func reviewSkip(t *testing.T) {
	t.Helper()
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("the worker's filter is for linux/amd64")
	}
}

// runAttacker runs a confined attacker and fails the test unless it died
// by SIGSYS (the filter stopping it).
func runAttacker(t *testing.T, what string, env ...string) (string, bool) {
	t.Helper()
	cmd := workerCommand(t.TempDir())
	cmd.Env = append(append(os.Environ(), "REVIEW_CHILD="+what), env...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		if ws := cmd.ProcessState.Sys().(syscall.WaitStatus); ws.Signaled() && ws.Signal() == syscall.SIGSYS {
			return string(out), false // stopped
		}
		t.Logf("%s: the attack failed without SIGSYS: %v: %s", what, err, out)
		return string(out), false
	}
	return string(out), true
}

func startVictim(t *testing.T) (*exec.Cmd, int, string, string, *bufio.Reader) {
	t.Helper()
	cmd := workerCommand(t.TempDir())
	cmd.Env = append(os.Environ(), "REVIEW_CHILD=victim")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(stdout)
	line, err := r.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(line)
	pid, _ := strconv.Atoi(f[0])
	return cmd, pid, f[1], f[2], r
}

// A confined worker reads and writes the memory of another process of its
// user (here a stand-in for the supervisor, which holds the master key,
// the CSV device and the network): code execution outside the filter.
func TestReviewConfineProcPidMem(t *testing.T) {
	reviewSkip(t)
	victim, pid, secretAt, flagAt, r := startVictim(t)
	out, ok := runAttacker(t, "procmem", fmt.Sprint("REVIEW_VICTIM=", pid), "REVIEW_SECRET_AT="+secretAt, "REVIEW_FLAG_AT="+flagAt)
	if !ok {
		return
	}
	rest, _ := r.ReadString('\n')
	victim.Wait()
	t.Errorf("confined worker opened /proc/%d/mem of an unconfined process: %s; victim: %q (exit %v)", pid, strings.TrimSpace(out), rest, victim.ProcessState)
}

// attackOtherProcess starts victim, runs the attacker case what against
// it, and returns the attacker's output, whether it completed, and how the
// victim ended within wait (nil: still running).
func attackOtherProcess(t *testing.T, what string, wait time.Duration, victim *exec.Cmd) (string, bool, *os.ProcessState) {
	t.Helper()
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { victim.Process.Kill() })
	out, ok := runAttacker(t, what, fmt.Sprint("REVIEW_VICTIM=", victim.Process.Pid))
	if !ok {
		return out, false, nil // stopped
	}
	done := make(chan struct{})
	go func() { victim.Wait(); close(done) }()
	select {
	case <-done:
		return out, true, victim.ProcessState
	case <-time.After(wait):
		return out, true, nil
	}
}

// A confined worker kills any process of its user (the supervisor, every
// other instance's worker) with fcntl(F_SETOWN, F_SETSIG=SIGKILL, O_ASYNC).
func TestReviewConfineSignalViaFSetown(t *testing.T) {
	reviewSkip(t)
	out, ok, ended := attackOtherProcess(t, "setown", 3*time.Second, exec.Command("sleep", "30"))
	if ok && ended != nil {
		t.Errorf("confined worker sent SIGKILL to another process through F_SETOWN/F_SETSIG: victim ended %v (%s)", ended, out)
	}
}

// A confined worker sets another process's resource limits (prlimit64
// with a pid): RLIMIT_CPU 1 s kills it; RLIMIT_NOFILE 0 starves it.
func TestReviewConfinePrlimitOtherProcess(t *testing.T) {
	reviewSkip(t)
	out, ok, ended := attackOtherProcess(t, "prlimit", 5*time.Second, exec.Command("sh", "-c", "while :; do :; done"))
	if ok {
		t.Errorf("confined worker set RLIMIT_CPU of another process: victim ended %v (%s)", ended, out)
	}
}

// A confined worker starts a process of its own (clone without thread
// flags), which outlives it: the supervisor's Kill and Pdeathsig reach only
// the worker's pid.
func TestReviewConfineForkOutlivesWorker(t *testing.T) {
	reviewSkip(t)
	out, ok := runAttacker(t, "fork")
	if !ok {
		return
	}
	var pid int
	for _, l := range strings.Split(out, "\n") {
		if n, err := strconv.Atoi(strings.TrimSpace(l)); err == nil {
			pid = n
		}
	}
	time.Sleep(200 * time.Millisecond)
	if pid > 0 && syscall.Kill(pid, 0) == nil {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Errorf("confined worker exited, and the process %d it forked was still running (killed by the test now)", pid)
	}
}

// clone(CLONE_NEWUSER|CLONE_NEWNET|CLONE_NEWNS) is allowed: new namespaces
// (and the kernel surface behind them) for the attacker.
func TestReviewConfineCloneNewUserNS(t *testing.T) {
	reviewSkip(t)
	if out, ok := runAttacker(t, "userns"); ok {
		t.Errorf("confined worker created namespaces: %s", out)
	}
}

// Running as root with every capability (the shipped systemd unit has no
// User= and no CapabilityBoundingSet=), a confined worker may write
// sysctls: core_pattern "|cmd" is root code execution outside the filter.
func TestReviewConfineSysctlWritable(t *testing.T) {
	reviewSkip(t)
	if os.Geteuid() != 0 {
		t.Skip("needs the backend's user, root")
	}
	// A worker without capabilities is still uid 0, and the kernel lets
	// uid 0 write root's 0644 sysctls: a root worker's /proc is empty (its
	// own mount namespace, early_linux.go).
	if out, ok := runAttacker(t, "core_pattern"); ok {
		t.Errorf("confined worker (root, all capabilities) can write sysctls: %s", out)
	}
}

// A confined worker reopens another process's pipe through
// /proc/<pid>/fd/N and reads what is written into it: a spare worker's
// key pipe, through which the supervisor sends the next instance's state
// key. It puts the bytes back, so the spare starts normally.
func TestReviewConfineStealPipeViaProcFd(t *testing.T) {
	reviewSkip(t)
	keyR, keyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	// The "spare": holds the read end as fd 3 and reads it once told to.
	spare := workerCommand(t.TempDir())
	spare.Env = append(os.Environ(), "REVIEW_CHILD=spare")
	spare.ExtraFiles = []*os.File{keyR}
	stdin, _ := spare.StdinPipe()
	var spareOut strings.Builder
	spare.Stdout = &spareOut
	if err := spare.Start(); err != nil {
		t.Fatal(err)
	}
	keyR.Close()
	t.Cleanup(func() { spare.Process.Kill() })

	att := workerCommand(t.TempDir())
	att.Env = append(os.Environ(), "REVIEW_CHILD=pipe-steal", fmt.Sprint("REVIEW_VICTIM=", spare.Process.Pid), "REVIEW_FD=3")
	attOut, _ := att.StdoutPipe()
	var attErr strings.Builder
	att.Stderr = &attErr
	if err := att.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(attOut)
	line, _ := r.ReadString('\n')
	if strings.TrimSpace(line) != "ready" {
		att.Wait()
		t.Logf("attacker stopped: %v %s", att.ProcessState, attErr.String())
		return
	}
	time.Sleep(200 * time.Millisecond) // the attacker blocks in read
	const key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
	stdin.Write([]byte("go\n")) // the supervisor sends the spare its flags...
	keyW.Write([]byte(key))     // ...then the key
	keyW.Close()
	stolen, _ := r.ReadString('\n')
	att.Wait()
	spare.Wait()
	if att.ProcessState.Success() {
		t.Errorf("confined worker read another process's key pipe: %s; the owner still got %q", strings.TrimSpace(stolen), spareOut.String())
	}
}
