// Package pump copies bytes between two sockets on a thread of its own,
// outside Go's scheduler: the host's relay (frontend.Relay) uses it for
// every relayed connection, so that a message through the relay costs
// one thread wake-up and two system calls instead of a netpoller wake-up,
// a goroutine switch and Go's idle spinning in each direction (on the
// attested path, twice per TPM command).
//
// The copy keeps TCP's backpressure: a side's bytes are read only when
// what was read before has been sent on (at most 64 KiB held per
// direction). What the host can do with it: nothing new; it relays the
// attested link's ciphertext either way, and the relay is the host's own.
package pump

/*
#cgo CFLAGS: -O2 -Wall
#include "pump.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrUnsupported is returned by Run when it cannot copy the pair on a
// thread (a connection without a descriptor, or no thread to be had);
// nothing was read, both connections are as they were, and the caller
// copies in Go.
var ErrUnsupported = errors.New("pump: cannot copy this pair on a thread")

// startThread starts the C copy loop; tests replace it.
var startThread = func(a, b, stop, done int) syscall.Errno {
	return syscall.Errno(C.cvtpm_pump_start(C.int(a), C.int(b), C.int(stop), C.int(done)))
}

// maxThreads bounds the copy threads of a process, and with them the
// tasks that guests' connections can take from the Go runtime, which
// aborts the whole process when it cannot start a thread it needs. Beyond
// the bound (or half the headroom a task limit leaves, threadBudget) Run
// returns ErrUnsupported and the caller copies in Go, on goroutines.
const maxThreads = 256

var (
	threads      atomic.Int64 // copy threads running
	budgetOnce   sync.Once
	threadBudget int64
)

// budget is maxThreads, or half the headroom under the process's task
// limits when that is less: the cgroup's pids.max (systemd's TasksMax, a
// container's limit) and, for a process that is not root, RLIMIT_NPROC.
func budget() int64 {
	budgetOnce.Do(func() {
		threadBudget = maxThreads
		if h, ok := taskHeadroom(); ok {
			threadBudget = max(0, min(threadBudget, h/2))
		}
	})
	return threadBudget
}

func taskHeadroom() (int64, bool) {
	headroom, found := int64(0), false
	note := func(h int64) {
		if !found || h < headroom {
			headroom, found = h, true
		}
	}
	if limit, cur, ok := cgroupPids(); ok {
		note(limit - cur)
	}
	if os.Geteuid() != 0 {
		var r unix.Rlimit
		if unix.Getrlimit(unix.RLIMIT_NPROC, &r) == nil && r.Cur != unix.RLIM_INFINITY {
			// The limit counts every task of the user; this process's
			// own are the part known here.
			note(int64(r.Cur) - int64(ownThreads()))
		}
	}
	return headroom, found
}

// cgroupPids reads the cgroup v2 pids.max and pids.current of this
// process's cgroup.
func cgroupPids() (limit, cur int64, ok bool) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return 0, 0, false
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		path, found := strings.CutPrefix(line, "0::")
		if !found {
			continue
		}
		dir := filepath.Join("/sys/fs/cgroup", path)
		m, err1 := os.ReadFile(filepath.Join(dir, "pids.max"))
		c, err2 := os.ReadFile(filepath.Join(dir, "pids.current"))
		if err1 != nil || err2 != nil {
			return 0, 0, false
		}
		limit, err1 = strconv.ParseInt(strings.TrimSpace(string(m)), 10, 64) // "max": no limit
		cur, err2 = strconv.ParseInt(strings.TrimSpace(string(c)), 10, 64)
		return limit, cur, err1 == nil && err2 == nil
	}
	return 0, 0, false
}

func ownThreads() int {
	b, _ := os.ReadFile("/proc/self/status")
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Run copies between a and b until both directions have ended: the end of
// one side's sending is passed on as a half-close (shutdown SHUT_WR) and
// the other direction goes on; an error on either side, or ctx's end,
// ends both. a and b are closed when Run returns, except on
// ErrUnsupported, when both are as they were.
func Run(ctx context.Context, a, b syscall.Conn) error {
	if threads.Add(1) > budget() {
		threads.Add(-1)
		return fmt.Errorf("%w: %d copy threads running", ErrUnsupported, budget())
	}
	started := false
	defer func() {
		if !started {
			threads.Add(-1)
		}
	}()
	fa, err := dupSocket(a)
	if err != nil {
		return err
	}
	fb, err := dupSocket(b)
	if err != nil {
		unix.Close(fa)
		return err
	}
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(fa)
		unix.Close(fb)
		return fmt.Errorf("%w: eventfd: %v", ErrUnsupported, err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		unix.Close(fa)
		unix.Close(fb)
		unix.Close(stop)
		return fmt.Errorf("%w: pipe: %v", ErrUnsupported, err)
	}
	// The thread owns fa, fb and the pipe's write end once it runs.
	if errno := startThread(fa, fb, stop, p[1]); errno != 0 {
		for _, fd := range []int{fa, fb, stop, p[0], p[1]} {
			unix.Close(fd)
		}
		return fmt.Errorf("%w: starting the copy thread: %v", ErrUnsupported, errno)
	}
	started = true
	// The originals leave Go's netpoller now: left registered, every
	// message would wake it for a descriptor no goroutine reads.
	closeConn(a)
	closeConn(b)
	done := os.NewFile(uintptr(p[0]), "pump-done") // non-blocking: read in the netpoller
	defer done.Close()
	fired := make(chan struct{})
	cancel := context.AfterFunc(ctx, func() {
		defer close(fired)
		unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	})
	// The thread closes its end of the pipe when it is done; the read
	// waits in the netpoller meanwhile, holding no thread.
	var one [1]byte
	_, err = done.Read(one[:])
	// stop is closed only once nothing can write it (a callback that has
	// started is waited for: its write would otherwise land on whatever
	// descriptor took the number) and the thread, which polls it, ended.
	if !cancel() {
		<-fired
	}
	if err != nil && !errors.Is(err, io.EOF) {
		// Not known to have ended: leave stop open and the thread
		// counted rather than let its descriptor number be reused.
		return fmt.Errorf("pump: waiting for the copy thread: %w", err)
	}
	unix.Close(stop)
	threads.Add(-1)
	return nil
}

func closeConn(c syscall.Conn) {
	if cl, ok := c.(io.Closer); ok {
		cl.Close()
	}
}

// dupSocket returns a close-on-exec duplicate of c's descriptor, which
// stays non-blocking (the flag belongs to the shared file description).
func dupSocket(c syscall.Conn) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1, ErrUnsupported
	}
	fd := -1
	var dupErr error
	if err := raw.Control(func(orig uintptr) { fd, dupErr = unix.FcntlInt(orig, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, ErrUnsupported
	}
	if dupErr != nil {
		return -1, fmt.Errorf("%w: dup: %v", ErrUnsupported, dupErr)
	}
	return fd, nil
}
