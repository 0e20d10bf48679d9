// Package confine narrows what a vTPM worker process may ask of the
// kernel once it has set itself up, with a seccomp filter.
//
// A worker runs libtpms on TPM commands that the host (through its
// frontend) and the guest send. A memory-safety bug in libtpms would give
// whoever sent the command the worker's rights, and without confinement
// those are the backend's own: the same user, the CSV guest device (whose
// reports make the key broker release every instance's key), the network,
// and signals to the supervisor. The filter leaves a worker what serving
// its one instance takes (its inherited socket, its state directory's
// files, memory, threads, time) and kills the process on anything else:
// no new sockets or connections, no ioctl (so no CSV reports), no exec, no
// ptrace or reads of other processes' memory, no signals to other
// processes, no other system-call ABI (32-bit or x32). The supervisor logs
// the death and restarts the worker from its sealed state.
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

// Worker installs the worker's filter on every thread of the process. It
// cannot be undone. Call it after start-up (flags read, keys read, state
// opened, libtpms initialised) and before the first command.
func Worker(mode Mode) error {
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		return ErrUnsupported
	}
	refuse := uint32(unix.SECCOMP_RET_KILL_PROCESS)
	if mode == ModeLog {
		refuse = unix.SECCOMP_RET_LOG
	}
	prog, err := bpf.Assemble(workerFilter(refuse, uint32(os.Getpid())))
	if err != nil {
		return fmt.Errorf("assembling the worker's seccomp filter: %w", err)
	}
	filter := make([]unix.SockFilter, len(prog))
	for i, in := range prog {
		filter[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	// No privileges gained through exec from here on: the kernel's
	// condition for an unprivileged process to install a filter.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("installing the worker's seccomp filter: no_new_privs: %w", err)
	}
	// TSYNC: every thread the process already has, not only this one (new
	// threads inherit the filter).
	if _, _, e := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&fprog))); e != 0 {
		return fmt.Errorf("installing the worker's seccomp filter: %w", e)
	}
	return nil
}

// workerSyscalls is what a worker serving its instance does after start-up
// (the Go runtime, glibc's thread start for cgo, libtpms with OpenSSL, the
// state store), checked by running the whole test suite with ModeLog and
// an empty kernel log of refusals. The busiest come first: the filter
// tries them in order.
var workerSyscalls = []uint32{
	// The inherited socket to the supervisor (read and written as a
	// blocking file), and the netpoller's own descriptors. No socket,
	// connect, bind, listen or accept: the worker makes no connection and
	// takes none.
	unix.SYS_READ, unix.SYS_WRITE, unix.SYS_FUTEX, unix.SYS_NANOSLEEP, unix.SYS_SCHED_YIELD,
	unix.SYS_EPOLL_PWAIT, unix.SYS_EPOLL_WAIT, unix.SYS_EPOLL_CTL, unix.SYS_EPOLL_CREATE1, unix.SYS_EVENTFD2, unix.SYS_PIPE2,
	unix.SYS_READV, unix.SYS_WRITEV, unix.SYS_RECVFROM, unix.SYS_RECVMSG, unix.SYS_SENDTO, unix.SYS_SENDMSG,
	unix.SYS_SHUTDOWN, unix.SYS_GETSOCKOPT, unix.SYS_SETSOCKOPT, unix.SYS_GETSOCKNAME, unix.SYS_GETPEERNAME,
	unix.SYS_POLL, unix.SYS_PPOLL, unix.SYS_CLOSE, unix.SYS_FCNTL, unix.SYS_DUP, unix.SYS_DUP3,
	// The state directory (opened relative to its descriptor) and its
	// files. No ioctl: it is how the CSV guest device is asked for
	// reports.
	unix.SYS_OPENAT, unix.SYS_PREAD64, unix.SYS_PWRITE64, unix.SYS_LSEEK, unix.SYS_FSTAT, unix.SYS_NEWFSTATAT, unix.SYS_STATX,
	unix.SYS_FSYNC, unix.SYS_FDATASYNC, unix.SYS_FTRUNCATE, unix.SYS_FALLOCATE, unix.SYS_FLOCK,
	unix.SYS_RENAMEAT, unix.SYS_RENAMEAT2, unix.SYS_UNLINKAT, unix.SYS_MKDIRAT, unix.SYS_GETDENTS64,
	unix.SYS_READLINKAT, unix.SYS_FACCESSAT, unix.SYS_FACCESSAT2,
	// Memory.
	unix.SYS_MMAP, unix.SYS_MUNMAP, unix.SYS_MPROTECT, unix.SYS_MADVISE, unix.SYS_MREMAP, unix.SYS_BRK,
	// Threads (the Go runtime's, and glibc's for cgo, which tries clone3
	// first), time.
	unix.SYS_CLONE, unix.SYS_CLONE3, unix.SYS_SET_ROBUST_LIST, unix.SYS_RSEQ, unix.SYS_SET_TID_ADDRESS,
	unix.SYS_SCHED_GETAFFINITY, unix.SYS_GETTID, unix.SYS_GETPID, unix.SYS_EXIT, unix.SYS_EXIT_GROUP,
	unix.SYS_CLOCK_NANOSLEEP, unix.SYS_CLOCK_GETTIME, unix.SYS_CLOCK_GETRES, unix.SYS_GETTIMEOFDAY, unix.SYS_RESTART_SYSCALL,
	// Signals: handlers and masks; sending only to this process (below).
	unix.SYS_RT_SIGACTION, unix.SYS_RT_SIGPROCMASK, unix.SYS_RT_SIGRETURN, unix.SYS_SIGALTSTACK,
	// Randomness (OpenSSL seeds libtpms' RNG) and limits.
	unix.SYS_GETRANDOM, unix.SYS_PRLIMIT64, unix.SYS_GETRLIMIT, unix.SYS_UNAME,
}

// workerSelfSignals may be called only with the worker's own pid as first
// argument: the Go runtime preempts its threads with tgkill and re-raises
// fatal signals with kill, both to itself.
var workerSelfSignals = []uint32{unix.SYS_TGKILL, unix.SYS_KILL}

// Offsets into struct seccomp_data, which the filter reads.
const (
	offNr         = 0
	offArch       = 4
	offArg0Low    = 16 // args[0], little-endian
	offArg0High   = 20
	x32SyscallBit = 0x40000000
)

// workerFilter is the classic BPF program: the x86-64 ABI only (no i386,
// no x32), the listed calls, kill and tgkill to pid only; refuse for
// everything else.
func workerFilter(refuse, pid uint32) []bpf.Instruction {
	// Layout: header (4), one jump per listed call, one per self-signal
	// call, refuse (the default), the pid check (4), allow, and a refuse
	// the check jumps to (classic BPF jumps only forward).
	n, m := len(workerSyscalls), len(workerSelfSignals)
	refuseAt := 4 + n + m
	checkAt := refuseAt + 1
	allowAt := checkAt + 4
	refuseEnd := allowAt + 1
	p := make([]bpf.Instruction, 0, refuseEnd+1)
	// skip is the offset of a jump at instruction i to target.
	skip := func(i, target int) uint8 {
		d := target - i - 1
		if d < 0 || d > 255 {
			panic(fmt.Sprintf("confine: a jump of %d instructions does not fit classic BPF", d))
		}
		return uint8(d)
	}
	p = append(p,
		bpf.LoadAbsolute{Off: offArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.AUDIT_ARCH_X86_64, SkipFalse: skip(1, refuseAt)},
		bpf.LoadAbsolute{Off: offNr, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: x32SyscallBit, SkipTrue: skip(3, refuseAt)},
	)
	for _, nr := range workerSyscalls {
		p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipTrue: skip(len(p), allowAt)})
	}
	for _, nr := range workerSelfSignals {
		p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: nr, SkipTrue: skip(len(p), checkAt)})
	}
	p = append(p,
		bpf.RetConstant{Val: refuse},
		// The whole 64-bit argument must be pid: the kernel reads a pid_t
		// from the low half, so a check of the low half alone would do,
		// but a caller has no reason to set the upper bits.
		bpf.LoadAbsolute{Off: offArg0Low, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: pid, SkipFalse: skip(checkAt+1, refuseEnd)},
		bpf.LoadAbsolute{Off: offArg0High, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0, SkipFalse: skip(checkAt+3, refuseEnd)},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
		bpf.RetConstant{Val: refuse},
	)
	return p
}
