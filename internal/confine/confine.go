// Package confine takes from a vTPM worker process, and from the swtpm
// drop-in, what it does not need to serve its TPM, so that code running
// in it cannot reach further.
//
// A worker runs libtpms on TPM commands that the host (through its
// frontend) and the guest send, and on state read from a disk the host
// holds. A memory-safety bug in libtpms would give whoever sent the bytes
// the worker's rights, and without confinement those are the backend's
// own: the same user (root, in the shipped unit), the CSV guest device
// (whose reports make the key broker release every instance's key), the
// network, the supervisor's memory and every other process of the user.
//
// Two steps. Before the Go runtime starts (early_linux.go, a C
// constructor in any process started with --conn-fd), a worker closes
// the descriptors it inherited but its own, moves into a mount namespace
// whose root holds the backend's state directory and nothing else (in a
// user namespace of its own if it is not root), becomes non-dumpable and
// drops every capability. Once it has its
// flags and key, Worker checks that and installs a seccomp filter that
// leaves what serving takes (its inherited socket, its state directory's
// files, memory, threads, time) and kills the process on anything else: no
// new sockets or connections, no ioctl (so no CSV reports), no exec, no
// executable memory (mmap or mprotect with PROT_EXEC), no ptrace, signals
// or limits for other processes, no new processes or namespaces, no other
// system-call ABI (32-bit or x32). The supervisor
// logs the death and restarts the worker from its sealed state.
//
// The swtpm drop-in (cvtpm-swtpm, `cvtpm socket`) installs a filter too,
// with the worker's list and accepting connections besides (DropIn): on
// the host it runs libtpms on a guest's commands. Its early step is
// smaller (no mount namespace, no dropped capabilities: it is started as
// swtpm is, by libvirt or an operator, and its user's files stay in
// reach): it records the descriptors it inherited (DropInInherited), and
// has Landlock refuse it opening files beneath /proc and /sys for
// writing (DropInLandlock), without which /proc/self/mem would let it
// write its own code past the filter's refusal of executable memory.
//
// The list is an allow-list: a system call not named here, including one
// added to a future kernel, is refused. ModeLog lets every call through and
// has the kernel log the ones the list would refuse (audit type 1326 in
// the kernel log), to find a call a new platform needs.
package confine

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Mode says what happens to a system call the worker's list does not
// allow.
type Mode string

const (
	// ModeKill kills the process (SECCOMP_RET_KILL_PROCESS). The default.
	ModeKill Mode = "kill"
	// ModeLog allows it and has the kernel log it (SECCOMP_RET_LOG): for
	// finding what a platform needs, not for production.
	ModeLog Mode = "log"
)

// ParseMode reads a mode as the command line gives it.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case ModeKill, ModeLog:
		return Mode(s), nil
	}
	return "", fmt.Errorf("seccomp mode %q: want %q or %q", s, ModeKill, ModeLog)
}

// ErrUnsupported: this platform has no list (the filter is written for
// linux/amd64, the platform of HYGON CSV).
var ErrUnsupported = errors.New("confine: no seccomp filter for this platform")

// Worker checks what the worker gave up before Go started (early_linux.go)
// and installs the worker's filter on every thread of the process. It
// cannot be undone. Call it once the worker has its flags and its key,
// before it reads state or a command.
func Worker(mode Mode) error {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		return ErrUnsupported
	}
	if err := checkEarly(); err != nil {
		return err
	}
	return install(workerSyscalls, mode, "the worker's")
}

// DropIn installs the swtpm drop-in's filter (cvtpm-swtpm, cvtpm socket)
// on every thread of the process: the worker's list and what serving
// swtpm's sockets takes besides (accepting connections on the listeners
// it already has). It cannot be undone. Call it once the sockets listen,
// before the state is read and the first command or control message is
// served. It is what swtpm's own --seccomp action=kill|log gives, and
// more: a libtpms bug that a guest's commands reach gets no exec, no new
// socket or connection, no ioctl, no executable memory and no other
// process. The drop-in has no mount
// namespace: the files its user may open stay within reach.
func DropIn(mode Mode) error {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		return ErrUnsupported
	}
	return install(dropInSyscalls, mode, "the drop-in's")
}

// install assembles a filter allowing allowed (and the calls whose
// arguments filter checks) and installs it on every thread.
func install(allowed []uint32, mode Mode, whose string) error {
	refuse := uint32(unix.SECCOMP_RET_KILL_PROCESS)
	if mode == ModeLog {
		refuse = unix.SECCOMP_RET_LOG
	}
	prog, err := bpf.Assemble(filter(allowed, refuse, uint32(os.Getpid())))
	if err != nil {
		return fmt.Errorf("assembling %s seccomp filter: %w", whose, err)
	}
	sf := make([]unix.SockFilter, len(prog))
	for i, in := range prog {
		sf[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(sf)), Filter: &sf[0]}
	// no_new_privs belongs to a thread, and the kernel asks it of the
	// thread that installs the filter: both calls on one thread (TSYNC
	// then sets it on the others).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// No privileges gained through exec from here on: the kernel's
	// condition for an unprivileged process to install a filter.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("installing %s seccomp filter: no_new_privs: %w", whose, err)
	}
	// TSYNC: every thread the process already has, not only this one (new
	// threads inherit the filter).
	r, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog)))
	if e != 0 {
		return fmt.Errorf("installing %s seccomp filter: %w", whose, e)
	}
	if r != 0 {
		// TSYNC's failure is not an errno: the id of a thread that could
		// not take the filter, and then no thread has it.
		return fmt.Errorf("installing %s seccomp filter: thread %d could not take it", whose, r)
	}
	return nil
}

// workerSyscalls is what a worker does from opening its state on (the Go
// runtime, glibc's thread start for cgo, libtpms with OpenSSL, the state
// store), checked by running the whole test suite with ModeLog and
// an empty kernel log of refusals. The busiest come first: the filter
// tries them in order. Calls whose arguments decide are in filter.
var workerSyscalls = []uint32{
	// The inherited socket to the supervisor (read and written as a
	// blocking file), and the netpoller's own descriptors. No socket,
	// connect, bind, listen or accept: the worker makes no connection and
	// takes none.
	unix.SYS_READ, unix.SYS_WRITE, unix.SYS_FUTEX, unix.SYS_NANOSLEEP, unix.SYS_SCHED_YIELD,
	unix.SYS_EPOLL_PWAIT, unix.SYS_EPOLL_WAIT, unix.SYS_EPOLL_CTL, unix.SYS_EPOLL_CREATE1, unix.SYS_EVENTFD2, unix.SYS_PIPE2,
	unix.SYS_READV, unix.SYS_WRITEV, unix.SYS_RECVFROM, unix.SYS_RECVMSG, unix.SYS_SENDTO, unix.SYS_SENDMSG,
	unix.SYS_SHUTDOWN, unix.SYS_GETSOCKOPT, unix.SYS_SETSOCKOPT, unix.SYS_GETSOCKNAME, unix.SYS_GETPEERNAME,
	unix.SYS_POLL, unix.SYS_PPOLL, unix.SYS_CLOSE, unix.SYS_DUP, unix.SYS_DUP3,
	// The state directory (opened relative to its descriptor) and its
	// files. No ioctl: it is how the CSV guest device is asked for
	// reports.
	unix.SYS_OPENAT, unix.SYS_PREAD64, unix.SYS_PWRITE64, unix.SYS_LSEEK, unix.SYS_FSTAT, unix.SYS_NEWFSTATAT, unix.SYS_STATX,
	unix.SYS_FSYNC, unix.SYS_FDATASYNC, unix.SYS_FTRUNCATE, unix.SYS_FALLOCATE, unix.SYS_FLOCK,
	unix.SYS_RENAMEAT, unix.SYS_RENAMEAT2, unix.SYS_UNLINKAT, unix.SYS_MKDIRAT, unix.SYS_GETDENTS64,
	unix.SYS_READLINKAT, unix.SYS_FACCESSAT, unix.SYS_FACCESSAT2,
	// Memory (mmap and mprotect are checked in filter: never executable).
	unix.SYS_MUNMAP, unix.SYS_MADVISE, unix.SYS_MREMAP, unix.SYS_BRK,
	// Threads (clone is checked below), time.
	unix.SYS_SET_ROBUST_LIST, unix.SYS_RSEQ, unix.SYS_SET_TID_ADDRESS,
	unix.SYS_SCHED_GETAFFINITY, unix.SYS_GETTID, unix.SYS_GETPID, unix.SYS_EXIT, unix.SYS_EXIT_GROUP,
	unix.SYS_CLOCK_NANOSLEEP, unix.SYS_CLOCK_GETTIME, unix.SYS_CLOCK_GETRES, unix.SYS_GETTIMEOFDAY, unix.SYS_RESTART_SYSCALL,
	// Signals: handlers and masks; sending only to this process (below).
	unix.SYS_RT_SIGACTION, unix.SYS_RT_SIGPROCMASK, unix.SYS_RT_SIGRETURN, unix.SYS_SIGALTSTACK,
	// Randomness (OpenSSL seeds libtpms' RNG), limits.
	unix.SYS_GETRANDOM, unix.SYS_GETRLIMIT, unix.SYS_UNAME,
}

// dropInSyscalls is the worker's list and what the swtpm drop-in does
// besides once it serves: accept connections on its listeners (it opens
// no socket and connects nowhere; CMD_SET_DATAFD's descriptor arrives
// with recvmsg), dup2 (its --daemon child's stderr onto /dev/null), and
// time for a C library without the vDSO. Checked as the worker's was:
// the whole suite, whose tests run the drop-in under libvirt, QEMU,
// swtpm_setup and tpm2-tools, with ModeLog and no refusal in the kernel
// log.
var dropInSyscalls = append(append([]uint32{}, workerSyscalls...),
	unix.SYS_ACCEPT4, unix.SYS_ACCEPT, unix.SYS_DUP2, unix.SYS_TIME)

// workerFcntls are the fcntl commands a worker uses (descriptor flags,
// status flags, duplicates, locks). Not F_SETOWN, F_SETOWN_EX or F_SETSIG:
// with O_ASYNC they make the kernel signal any process of the user, around
// the kill check; not leases or directory notifications either.
var workerFcntls = []uint32{
	unix.F_DUPFD, unix.F_DUPFD_CLOEXEC, unix.F_GETFD, unix.F_SETFD, unix.F_GETFL,
	unix.F_GETLK, unix.F_SETLK, unix.F_SETLKW, unix.F_OFD_GETLK, unix.F_OFD_SETLK, unix.F_OFD_SETLKW,
}

// cloneNamespaces are the clone flags that make new namespaces (and reach
// the kernel code behind them).
const cloneNamespaces = unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC |
	unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWTIME

// Offsets into struct seccomp_data, which the filter reads. Arguments are
// 64 bits, little-endian: low half first.
const (
	offNr         = 0
	offArch       = 4
	x32SyscallBit = 0x40000000
)

func offArgLow(n uint32) uint32  { return 16 + 8*n }
func offArgHigh(n uint32) uint32 { return 16 + 8*n + 4 }

// filter is the classic BPF program: the x86-64 ABI only (no i386,
// no x32), the calls in allowed, and these with their arguments checked:
//
//   - kill and tgkill to pid only (the Go runtime preempts its threads
//     with tgkill and re-raises fatal signals with kill, both to itself);
//   - prlimit64 on the process itself (pid 0) only;
//   - fcntl with a listed command, or F_SETFL without O_ASYNC;
//   - clone of a thread (CLONE_THREAD) without new namespaces: no new
//     process, which the backend's kill of the worker would not reach;
//   - clone3, whose flags sit in memory the filter cannot read, fails with
//     ENOSYS, on which glibc starts its thread with clone;
//   - mmap and mprotect without PROT_EXEC: no memory becomes executable
//     once the process serves (W^X), so a bug that lets a guest's bytes
//     write memory cannot make them code, and has to reuse the code the
//     binary has. Neither the Go runtime, nor libtpms, OpenSSL or glibc's
//     thread start (the binaries' stacks are not executable, as
//     TestLeanBinaries checks) map code after start-up.
//
// Everything else gets refuse.
func filter(allowed []uint32, refuse, pid uint32) []bpf.Instruction {
	var b builder
	b.load(offArch)
	b.jumpUnless(unix.AUDIT_ARCH_X86_64, "refuse")
	b.load(offNr)
	b.add(bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: x32SyscallBit}, "refuse", "")
	for _, nr := range allowed {
		b.jumpIf(nr, "allow")
	}
	b.jumpIf(unix.SYS_KILL, "self")
	b.jumpIf(unix.SYS_TGKILL, "self")
	b.jumpIf(unix.SYS_PRLIMIT64, "this process")
	b.jumpIf(unix.SYS_FCNTL, "fcntl")
	b.jumpIf(unix.SYS_CLONE, "clone")
	b.jumpIf(unix.SYS_CLONE3, "enosys")
	b.jumpIf(unix.SYS_MMAP, "not executable")
	b.jumpIf(unix.SYS_MPROTECT, "not executable")
	b.ret(refuse)

	// prot is the third argument of both; its upper half has no flag a
	// caller needs.
	b.label("not executable")
	b.load(offArgHigh(2))
	b.jumpUnless(0, "refuse")
	b.load(offArgLow(2))
	b.add(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: unix.PROT_EXEC}, "refuse", "allow")

	// The whole 64-bit first argument must be pid (or 0): the kernel reads
	// a pid_t from the low half, but a caller has no reason to set the
	// upper bits.
	b.label("self")
	b.load(offArgHigh(0))
	b.jumpUnless(0, "refuse")
	b.load(offArgLow(0))
	b.jumpIf(pid, "allow")
	b.ret(refuse)

	b.label("this process")
	b.load(offArgHigh(0))
	b.jumpUnless(0, "refuse")
	b.load(offArgLow(0))
	b.jumpIf(0, "allow")
	b.ret(refuse)

	b.label("fcntl")
	b.load(offArgHigh(1))
	b.jumpUnless(0, "refuse")
	b.load(offArgLow(1))
	for _, cmd := range workerFcntls {
		b.jumpIf(cmd, "allow")
	}
	b.jumpUnless(unix.F_SETFL, "refuse")
	b.load(offArgLow(2))
	b.add(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: unix.O_ASYNC}, "refuse", "allow")

	b.label("clone")
	b.load(offArgLow(0))
	b.add(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: unix.CLONE_THREAD}, "", "refuse")
	b.add(bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: cloneNamespaces}, "refuse", "allow")

	b.label("enosys")
	b.ret(unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS))
	b.label("refuse")
	b.ret(refuse)
	b.label("allow")
	b.ret(unix.SECCOMP_RET_ALLOW)
	return b.assemble()
}

// builder writes a classic BPF program with jumps to named labels, which
// assemble resolves (classic BPF jumps only forward, at most 255).
type builder struct {
	prog   []bpf.Instruction
	jumps  map[int][2]string // instruction -> true and false targets ("" = next)
	labels map[string]int
}

func (b *builder) add(in bpf.Instruction, ifTrue, ifFalse string) {
	if b.jumps == nil {
		b.jumps = map[int][2]string{}
	}
	if ifTrue != "" || ifFalse != "" {
		b.jumps[len(b.prog)] = [2]string{ifTrue, ifFalse}
	}
	b.prog = append(b.prog, in)
}

func (b *builder) load(off uint32) { b.add(bpf.LoadAbsolute{Off: off, Size: 4}, "", "") }
func (b *builder) ret(v uint32)    { b.add(bpf.RetConstant{Val: v}, "", "") }

// jumpIf goes to label when the loaded word equals v.
func (b *builder) jumpIf(v uint32, label string) {
	b.add(bpf.JumpIf{Cond: bpf.JumpEqual, Val: v}, label, "")
}

// jumpUnless goes to label when the loaded word is not v.
func (b *builder) jumpUnless(v uint32, label string) {
	b.add(bpf.JumpIf{Cond: bpf.JumpEqual, Val: v}, "", label)
}

func (b *builder) label(name string) {
	if b.labels == nil {
		b.labels = map[string]int{}
	}
	b.labels[name] = len(b.prog)
}

func (b *builder) assemble() []bpf.Instruction {
	skip := func(from int, label string) uint8 {
		if label == "" {
			return 0
		}
		to, ok := b.labels[label]
		d := to - from - 1
		if !ok || d < 0 || d > 255 {
			panic(fmt.Sprintf("confine: jump from %d to %q (%d) does not fit classic BPF", from, label, to))
		}
		return uint8(d)
	}
	for i, t := range b.jumps {
		j := b.prog[i].(bpf.JumpIf)
		j.SkipTrue, j.SkipFalse = skip(i, t[0]), skip(i, t[1])
		b.prog[i] = j
	}
	return b.prog
}
