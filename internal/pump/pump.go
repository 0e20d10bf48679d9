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

// Run copies between a and b until either ends (it then half-closes the
// other's sending, as io.Copy users do, and ends the pair) or ctx ends.
// a and b are closed when Run returns, except on ErrUnsupported, when
// both are as they were.
func Run(ctx context.Context, a, b syscall.Conn) error {
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
	defer unix.Close(stop) // after the thread ended: it polls stop until then
	// The originals leave Go's netpoller now: left registered, every
	// message would wake it for a descriptor no goroutine reads.
	closeConn(a)
	closeConn(b)
	done := os.NewFile(uintptr(p[0]), "pump-done") // non-blocking: read in the netpoller
	defer done.Close()
	cancel := context.AfterFunc(ctx, func() {
		unix.Write(stop, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	})
	defer cancel()
	// The thread closes its end when it is done; the read waits in the
	// netpoller meanwhile, holding no thread.
	var one [1]byte
	if _, err := done.Read(one[:]); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("pump: waiting for the copy thread: %w", err)
	}
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
