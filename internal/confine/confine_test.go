package confine

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The filter cannot be removed once installed, so each case runs in a
// child: this test binary again, with CONFINE_CHILD naming what to do
// after installing the filter.
func TestMain(m *testing.M) {
	if what := os.Getenv("CONFINE_CHILD"); what != "" {
		os.Exit(child(what))
	}
	// A drop-in's child: started as "<test binary> socket", so that the
	// constructor confines it as it does cvtpm-swtpm socket.
	if what := os.Getenv("REVIEW_S32_CHILD"); what != "" {
		os.Exit(reviewS32Child(what))
	}
	if os.Getenv("DROPIN_WRITES_CHILD") != "" {
		os.Exit(dropInWritesChild())
	}
	os.Exit(m.Run())
}

// child installs the worker's filter and then does what; it returns 0 if
// what completed (a refused call kills it with SIGSYS first).
func child(what string) int {
	mode := ModeKill
	if os.Getenv("CONFINE_MODE") == "log" {
		mode = ModeLog
	}
	dir := os.Getenv("CONFINE_DIR")
	ppid := os.Getppid() // before the filter, which refuses getppid
	if what == "mounts" {
		// Before the filter, which refuses statfs.
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil || st.Flags&unix.ST_NOSUID == 0 || st.Flags&unix.ST_NODEV == 0 {
			fmt.Fprintf(os.Stderr, "the state root's mount flags are %#x (%v), want nosuid and nodev\n", st.Flags, err)
			return 2
		}
	}
	if what == "int80-unfiltered" {
		if err := int80Getpid(); err != nil {
			return 2
		}
		return 0
	}
	if err := Worker(mode); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	if what != "serve" && what != "mounts" {
		// The marker shows that the refused call is this one, not one
		// the runtime made before it.
		fmt.Fprintln(os.Stderr, "calling", what)
	}
	var err error
	switch what {
	case "serve":
		err = serveLikeAWorker(dir)
	case "socket":
		_, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	case "connect":
		// A unix socket the test listens on: the worker's way out to the
		// key broker or any other process.
		var c net.Conn
		c, err = net.Dial("unix", filepath.Join(dir, "sock"))
		if err == nil {
			c.Close()
		}
	case "ioctl":
		// How a CSV report is asked of /dev/csv-guest.
		_, err = unix.IoctlGetInt(0, unix.TIOCGPGRP)
	case "exec":
		err = syscall.Exec("/bin/true", []string{"true"}, nil)
	case "kill-parent":
		err = syscall.Kill(ppid, 0)
	case "ptrace":
		err = unix.PtraceAttach(ppid)
	case "process_vm_readv":
		_, err = unix.ProcessVMReadv(ppid, []unix.Iovec{{Base: new(byte), Len: 1}}, []unix.RemoteIovec{{Base: 0x1000, Len: 1}}, 0)
	case "mounts":
		err = mountsIsolated(dir)
	case "mmap-exec":
		// Code made from bytes a guest wrote: the first step of most
		// exploits that do not only reuse the binary's own code.
		_, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE|unix.PROT_EXEC, unix.MAP_PRIVATE|unix.MAP_ANON)
	case "mprotect-exec":
		var b []byte
		if b, err = unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANON); err == nil {
			err = unix.Mprotect(b, unix.PROT_READ|unix.PROT_EXEC)
		}
	case "int80":
		// The 32-bit ABI of a 64-bit process, a classic way around a
		// filter written for one ABI.
		err = int80Getpid()
	default:
		err = fmt.Errorf("unknown case %q", what)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, what+":", err)
		return 2
	}
	return 0
}

// serveLikeAWorker does what a worker does after start-up: state files
// written and renamed through a directory descriptor and synced, threads,
// timers, a garbage collection, randomness, its own signals.
func serveLikeAWorker(dir string) error {
	d, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(d)
	for i := range 3 {
		fd, err := unix.Openat(d, "blob.tmp", unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		b := make([]byte, 16<<10)
		rand.Read(b)
		if _, err := unix.Write(fd, b); err != nil {
			return err
		}
		if err := unix.Fsync(fd); err != nil {
			return err
		}
		unix.Close(fd)
		if err := unix.Renameat(d, "blob.tmp", d, fmt.Sprintf("blob%d", i)); err != nil {
			return err
		}
	}
	if err := unix.Fsync(d); err != nil {
		return err
	}
	if _, err := os.ReadDir(dir); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(dir, "blob0")); err != nil {
		return err
	}
	// New OS threads (locked goroutines force them), the scheduler's
	// preemption signals, timers and a collection.
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			end := time.Now().Add(30 * time.Millisecond)
			for x := 0; time.Now().Before(end); x++ {
				_ = make([]byte, 64<<10)
			}
		}()
	}
	wg.Wait()
	runtime.GC()
	time.Sleep(time.Millisecond)
	// The process's own signals.
	if err := syscall.Kill(os.Getpid(), 0); err != nil {
		return err
	}
	// The inherited socket: a socketpair made before the filter would be
	// the supervisor's; stdout stands in for it.
	_, err = os.Stdout.Write([]byte("served\n"))
	return err
}

// workerCommand runs this test binary as a worker would be run: with
// --conn-fd, so that it gives up its capabilities and, as root, its view
// of every mount but stateRoot before Go starts (early_linux.go).
func workerCommand(stateRoot string) *exec.Cmd {
	return exec.Command(os.Args[0], "-test.run=^$", "--", "--conn-fd", "--state-root", stateRoot)
}

// mountsIsolated checks, from inside a root worker, that its file system
// is its state root and nothing else: it writes there, and nowhere else
// (not even the new root's own directories), and finds none of the
// system's files.
func mountsIsolated(stateRoot string) error {
	if err := os.WriteFile(filepath.Join(stateRoot, "inside"), []byte("x"), 0o600); err != nil {
		return fmt.Errorf("writing inside the state root: %w", err)
	}
	for _, outside := range []string{filepath.Join(filepath.Dir(stateRoot), "outside"), "/outside"} {
		if err := os.WriteFile(outside, []byte("x"), 0o600); err == nil {
			return fmt.Errorf("wrote %s, outside the state root", outside)
		}
	}
	for _, p := range []string{"/proc/self/status", "/proc/1/root/etc/hostname", "/proc/sys/kernel/core_pattern", "/sys/kernel/uevent_helper",
		"/dev/null", "/etc/passwd", "/run", "/usr/bin"} {
		if f, err := os.OpenFile(p, os.O_RDONLY, 0); err == nil {
			f.Close()
			return fmt.Errorf("%s is still there", p)
		}
	}
	// Of the state root's parent, only the path to the state root.
	entries, err := os.ReadDir(filepath.Dir(stateRoot))
	if err != nil || len(entries) != 1 || entries[0].Name() != filepath.Base(stateRoot) {
		return fmt.Errorf("the state root's parent holds %v (%v), want only %s", entries, err, filepath.Base(stateRoot))
	}
	return nil
}

func runChild(t *testing.T, what, mode string) (*exec.Cmd, string, error) {
	t.Helper()
	dir := t.TempDir()
	ln, err := net.Listen("unix", filepath.Join(dir, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cmd := workerCommand(dir)
	cmd.Env = append(os.Environ(), "CONFINE_CHILD="+what, "CONFINE_DIR="+dir, "CONFINE_MODE="+mode)
	out, err := cmd.CombinedOutput()
	return cmd, string(out), err
}

func TestWorkerFilter(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("the worker's filter is for linux/amd64")
	}
	t.Run("serve", func(t *testing.T) {
		_, out, err := runChild(t, "serve", "kill")
		if err != nil {
			t.Fatalf("what a worker does was refused: %v\n%s", err, out)
		}
		if out != "served\n" {
			t.Fatalf("output %q", out)
		}
	})
	for _, what := range []string{"socket", "connect", "ioctl", "exec", "kill-parent", "ptrace", "process_vm_readv", "int80", "mmap-exec", "mprotect-exec"} {
		t.Run(what, func(t *testing.T) {
			if what == "int80" {
				if _, _, err := runChild(t, "int80-unfiltered", ""); err != nil {
					t.Skip("this kernel has no 32-bit system-call ABI (IA32 emulation off): nothing to get around the filter with")
				}
			}
			cmd, out, err := runChild(t, what, "kill")
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("%s was not refused (err %v): %s", what, err, out)
			}
			ws := cmd.ProcessState.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
				t.Fatalf("%s: want death by SIGSYS, got %v: %s", what, cmd.ProcessState, out)
			}
			if out != "calling "+what+"\n" {
				t.Fatalf("%s: killed before it was called: %q", what, out)
			}
		})
	}
	// Log mode refuses nothing: the call goes through (and the kernel logs it).
	t.Run("log mode", func(t *testing.T) {
		_, out, err := runChild(t, "connect", "log")
		if err != nil {
			t.Fatalf("log mode refused a call: %v: %s", err, out)
		}
	})
}

// A root worker's view of the file system: its state root and nothing else
// (uid 0 without capabilities could otherwise still read and write root's
// files, sysctls, block devices and root daemons' FIFOs, and reach other
// processes' roots through /proc/PID/root).
func TestWorkerMountsIsolated(t *testing.T) {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("the worker's confinement is for linux/amd64")
	}
	if _, out, err := runChild(t, "mounts", "kill"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// On a kernel without mount_setattr (before 5.12) the state root gets
	// nosuid and nodev by a remount instead.
	t.Setenv("CVTPM_CONFINE_OLD_KERNEL", "1")
	if _, out, err := runChild(t, "mounts", "kill"); err != nil {
		t.Fatalf("without mount_setattr: %v: %s", err, out)
	}
}

func TestParseMode(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Mode
		err  bool
	}{{"kill", ModeKill, false}, {"log", ModeLog, false}, {"none", "", true}, {"", "", true}, {"KILL", "", true}} {
		got, err := ParseMode(c.in)
		if (err != nil) != c.err || got != c.want {
			t.Errorf("ParseMode(%q) = %q, %v", c.in, got, err)
		}
	}
}

// TestWorkerFilterProgram runs the filter's program on seccomp_data in
// x/net/bpf's interpreter: every case, including those the machine cannot
// produce (the 32-bit ABI is off on some kernels).
func TestWorkerFilterProgram(t *testing.T) {
	const pid = 4242
	vm, err := bpf.NewVM(filter(workerSyscalls, unix.SECCOMP_RET_KILL_PROCESS, pid))
	if err != nil {
		t.Fatal(err)
	}
	data := seccompData
	const x86_64, i386 = unix.AUDIT_ARCH_X86_64, unix.AUDIT_ARCH_I386
	for _, c := range []struct {
		name      string
		arch, nr  uint32
		arg0      uint64
		wantAllow bool
		more      []uint64 // arguments 1 and on
	}{
		{"read", x86_64, unix.SYS_READ, 3, true, nil},
		{"write", x86_64, unix.SYS_WRITE, 3, true, nil},
		{"openat", x86_64, unix.SYS_OPENAT, 0, true, nil},
		{"tgkill to itself", x86_64, unix.SYS_TGKILL, pid, true, nil},
		{"kill to itself", x86_64, unix.SYS_KILL, pid, true, nil},
		{"kill to another process", x86_64, unix.SYS_KILL, pid + 1, false, nil},
		{"kill to its process group", x86_64, unix.SYS_KILL, 0, false, nil},
		{"kill to every process", x86_64, unix.SYS_KILL, 1<<64 - 1, false, nil},
		{"tgkill with upper bits set", x86_64, unix.SYS_TGKILL, 1<<32 | pid, false, nil},
		{"tkill (any thread by id)", x86_64, unix.SYS_TKILL, pid, false, nil},
		{"socket", x86_64, unix.SYS_SOCKET, 2, false, nil},
		{"connect", x86_64, unix.SYS_CONNECT, 3, false, nil},
		{"ioctl", x86_64, unix.SYS_IOCTL, 3, false, nil},
		{"execve", x86_64, unix.SYS_EXECVE, 0, false, nil},
		{"ptrace", x86_64, unix.SYS_PTRACE, 0, false, nil},
		{"process_vm_readv", x86_64, unix.SYS_PROCESS_VM_READV, 1, false, nil},
		{"pidfd_getfd", x86_64, unix.SYS_PIDFD_GETFD, 0, false, nil},
		{"io_uring_setup", x86_64, unix.SYS_IO_URING_SETUP, 0, false, nil},
		{"bpf", x86_64, unix.SYS_BPF, 0, false, nil},
		{"a call number no kernel has yet", x86_64, 1000, 0, false, nil},
		{"prlimit64 of itself", x86_64, unix.SYS_PRLIMIT64, 0, true, nil},
		{"prlimit64 of another process", x86_64, unix.SYS_PRLIMIT64, pid + 1, false, nil},
		{"prlimit64 of itself by pid", x86_64, unix.SYS_PRLIMIT64, pid, false, nil},
		{"fcntl F_GETFL", x86_64, unix.SYS_FCNTL, 3, true, []uint64{unix.F_GETFL}},
		{"fcntl F_SETFD", x86_64, unix.SYS_FCNTL, 3, true, []uint64{unix.F_SETFD, unix.FD_CLOEXEC}},
		{"fcntl F_SETFL O_NONBLOCK", x86_64, unix.SYS_FCNTL, 3, true, []uint64{unix.F_SETFL, unix.O_NONBLOCK}},
		{"fcntl F_SETFL O_ASYNC", x86_64, unix.SYS_FCNTL, 3, false, []uint64{unix.F_SETFL, unix.O_NONBLOCK | unix.O_ASYNC}},
		{"fcntl F_SETOWN", x86_64, unix.SYS_FCNTL, 3, false, []uint64{unix.F_SETOWN, 1}},
		{"fcntl F_SETOWN_EX", x86_64, unix.SYS_FCNTL, 3, false, []uint64{unix.F_SETOWN_EX, 0}},
		{"fcntl F_SETSIG", x86_64, unix.SYS_FCNTL, 3, false, []uint64{unix.F_SETSIG, 9}},
		{"fcntl F_SETLEASE", x86_64, unix.SYS_FCNTL, 3, false, []uint64{unix.F_SETLEASE, 1}},
		{"fcntl F_GETFL with upper bits", x86_64, unix.SYS_FCNTL, 3, false, []uint64{1<<32 | unix.F_GETFL}},
		{"clone of a Go runtime thread", x86_64, unix.SYS_CLONE, unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_SYSVSEM | unix.CLONE_THREAD, true, nil},
		{"clone of a glibc thread", x86_64, unix.SYS_CLONE, unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_THREAD | unix.CLONE_SYSVSEM | unix.CLONE_SETTLS | unix.CLONE_PARENT_SETTID | unix.CLONE_CHILD_CLEARTID, true, nil},
		{"clone of a process (fork)", x86_64, unix.SYS_CLONE, uint64(unix.SIGCHLD), false, nil},
		{"clone of a thread in a new user namespace", x86_64, unix.SYS_CLONE, unix.CLONE_VM | unix.CLONE_SIGHAND | unix.CLONE_THREAD | unix.CLONE_NEWUSER, false, nil},
		{"clone of a process in new namespaces", x86_64, unix.SYS_CLONE, unix.CLONE_NEWUSER | unix.CLONE_NEWNET | unix.CLONE_NEWNS | uint64(unix.SIGCHLD), false, nil},
		{"mmap of memory", x86_64, unix.SYS_MMAP, 0, true, []uint64{1 << 20, unix.PROT_READ | unix.PROT_WRITE}},
		{"mmap of nothing accessible (Go reserves its heap so)", x86_64, unix.SYS_MMAP, 0, true, []uint64{1 << 20, unix.PROT_NONE}},
		{"mprotect to read only (glibc's RELRO, a thread's guard)", x86_64, unix.SYS_MPROTECT, 0x1000, true, []uint64{4096, unix.PROT_READ}},
		{"mmap of executable memory", x86_64, unix.SYS_MMAP, 0, false, []uint64{1 << 20, unix.PROT_READ | unix.PROT_EXEC}},
		{"mmap of writable, executable memory", x86_64, unix.SYS_MMAP, 0, false, []uint64{1 << 20, unix.PROT_READ | unix.PROT_WRITE | unix.PROT_EXEC}},
		{"mprotect making memory executable", x86_64, unix.SYS_MPROTECT, 0x1000, false, []uint64{4096, unix.PROT_READ | unix.PROT_EXEC}},
		{"mprotect with upper bits of prot set", x86_64, unix.SYS_MPROTECT, 0x1000, false, []uint64{4096, 1<<32 | unix.PROT_READ}},
		{"pkey_mprotect (not needed; could make memory executable)", x86_64, unix.SYS_PKEY_MPROTECT, 0x1000, false, []uint64{4096, unix.PROT_READ}},
		{"read through the i386 ABI", i386, 3, 3, false, nil},
		{"read through the x32 ABI", x86_64, 0x40000000 | unix.SYS_READ, 3, false, nil},
	} {
		got, err := vm.Run(data(c.arch, c.nr, append([]uint64{c.arg0}, c.more...)...))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if allowed := uint32(got) == unix.SECCOMP_RET_ALLOW; allowed != c.wantAllow {
			t.Errorf("%s: filter returned %#x, want allowed=%v", c.name, got, c.wantAllow)
		}
	}
	// clone3 fails with ENOSYS (glibc then starts its threads with clone),
	// whatever the mode.
	if got, _ := vm.Run(data(x86_64, unix.SYS_CLONE3, 0)); uint32(got) != unix.SECCOMP_RET_ERRNO|uint32(unix.ENOSYS) {
		t.Errorf("clone3: filter returned %#x, want ERRNO(ENOSYS)", got)
	}
	// The other mode only changes what a refusal is.
	vm, _ = bpf.NewVM(filter(workerSyscalls, unix.SECCOMP_RET_LOG, pid))
	if got, _ := vm.Run(data(x86_64, unix.SYS_SOCKET, 2)); uint32(got) != unix.SECCOMP_RET_LOG {
		t.Errorf("log mode: socket gets %#x, want SECCOMP_RET_LOG", got)
	}
}

// seccompData is struct seccomp_data. The interpreter loads words
// big-endian where the kernel loads them in the machine's order, so each
// 32-bit word is written big-endian here.
func seccompData(arch, nr uint32, args ...uint64) []byte {
	b := make([]byte, 64)
	binary.BigEndian.PutUint32(b[0:], nr)
	binary.BigEndian.PutUint32(b[4:], arch)
	for i, a := range args {
		binary.BigEndian.PutUint32(b[16+8*i:], uint32(a))
		binary.BigEndian.PutUint32(b[20+8*i:], uint32(a>>32))
	}
	return b
}

// TestDropInFilterProgram: the swtpm drop-in keeps accepting on the
// listeners it has, and gets none of what a guest that took it over
// through libtpms would reach for on the host: no new socket or
// connection, no exec, no device, no other process, no kernel attack
// surface beyond serving.
func TestDropInFilterProgram(t *testing.T) {
	const pid = 4242
	vm, err := bpf.NewVM(filter(dropInSyscalls, unix.SECCOMP_RET_KILL_PROCESS, pid))
	if err != nil {
		t.Fatal(err)
	}
	const x86_64 = unix.AUDIT_ARCH_X86_64
	for _, c := range []struct {
		name      string
		nr        uint32
		arg0      uint64
		wantAllow bool
	}{
		{"accept4", unix.SYS_ACCEPT4, 3, true},
		{"accept", unix.SYS_ACCEPT, 3, true},
		{"recvmsg (CMD_SET_DATAFD's descriptor)", unix.SYS_RECVMSG, 3, true},
		{"dup2", unix.SYS_DUP2, 3, true},
		{"ppoll", unix.SYS_PPOLL, 0, true},
		{"fsync", unix.SYS_FSYNC, 3, true},
		{"renameat", unix.SYS_RENAMEAT, 3, true},
		{"unlinkat (its socket files at exit)", unix.SYS_UNLINKAT, 3, true},
		{"tgkill to itself", unix.SYS_TGKILL, pid, true},
		{"kill to another process", unix.SYS_KILL, pid + 1, false},
		{"socket", unix.SYS_SOCKET, 2, false},
		{"socketpair", unix.SYS_SOCKETPAIR, 1, false},
		{"connect", unix.SYS_CONNECT, 3, false},
		{"bind", unix.SYS_BIND, 3, false},
		{"listen", unix.SYS_LISTEN, 3, false},
		{"ioctl", unix.SYS_IOCTL, 3, false},
		{"execve", unix.SYS_EXECVE, 0, false},
		{"execveat", unix.SYS_EXECVEAT, 0, false},
		{"fork", unix.SYS_FORK, 0, false},
		{"clone of a process", unix.SYS_CLONE, uint64(unix.SIGCHLD), false},
		{"ptrace", unix.SYS_PTRACE, 0, false},
		{"process_vm_writev", unix.SYS_PROCESS_VM_WRITEV, 1, false},
		{"mount", unix.SYS_MOUNT, 0, false},
		{"unshare", unix.SYS_UNSHARE, 0, false},
		{"setns", unix.SYS_SETNS, 3, false},
		{"bpf", unix.SYS_BPF, 0, false},
		{"perf_event_open", unix.SYS_PERF_EVENT_OPEN, 0, false},
		{"io_uring_setup", unix.SYS_IO_URING_SETUP, 0, false},
		{"keyctl", unix.SYS_KEYCTL, 0, false},
		{"userfaultfd", unix.SYS_USERFAULTFD, 0, false},
		{"fchmodat", unix.SYS_FCHMODAT, 0, false},
		{"fchownat", unix.SYS_FCHOWNAT, 0, false},
		{"symlinkat", unix.SYS_SYMLINKAT, 0, false},
		{"linkat", unix.SYS_LINKAT, 0, false},
	} {
		got, err := vm.Run(seccompData(x86_64, c.nr, c.arg0))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if allowed := uint32(got) == unix.SECCOMP_RET_ALLOW; allowed != c.wantAllow {
			t.Errorf("%s: filter returned %#x, want allowed=%v", c.name, got, c.wantAllow)
		}
	}
	// The worker's list stays without accept: a worker takes no connection.
	wvm, _ := bpf.NewVM(filter(workerSyscalls, unix.SECCOMP_RET_KILL_PROCESS, pid))
	if got, _ := wvm.Run(seccompData(x86_64, unix.SYS_ACCEPT4, 3)); uint32(got) == unix.SECCOMP_RET_ALLOW {
		t.Error("the worker's filter allows accept4")
	}
}
