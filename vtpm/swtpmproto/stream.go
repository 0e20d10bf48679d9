package swtpmproto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/internal/netaddr"
)

// Streamer is a TPM that serves a kept data connection's commands itself,
// without returning to the server between them (*engine.TPM, in C:
// engine/stream.go says why). The server hands it a connection that keeps
// talking; a TPM that is not a Streamer (a frontend's remote engine) is
// served command by command.
type Streamer interface {
	// ServeStream serves fd, starting with the bytes in pending, until
	// the peer closes or stop is set and fd is shut down; fd stays open.
	// Frames are as ParseFrame reads them, commands of at most maxCommand
	// bytes; once ends it after one command; rejectLocality4 answers a
	// prefix at locality 4 with TPM_RC_LOCALITY, as answer does.
	ServeStream(fd int, pending []byte, maxCommand int, once, rejectLocality4 bool, stop *atomic.Int32) (commands uint64, err error)
}

// maxStreams bounds the connections served by the Streamer at once: each
// holds an OS thread while it lasts (waiting in read(2), as swtpm's one
// thread does). Further connections are served in Go, as they were before
// (fdio.go), whose waits hold no thread; the connection QEMU passes with
// CMD_SET_DATAFD does not count against it.
const maxStreams = 8

// streamer returns the TPM's Streamer, or nil when it has none or the
// server is told not to use it.
func (s *Server) streamer() Streamer {
	if s.opts.NoStreamLoop {
		return nil
	}
	st, _ := s.tpm.(Streamer)
	return st
}

// serveStream serves fd (owned by the caller, which closes it) with the
// Streamer, starting with the bytes in in, and reports whether it did;
// false leaves everything to the caller. reserved says the connection
// does not need one of the maxStreams slots.
func (s *Server) serveStream(ctx context.Context, fd *ownedFD, in []byte, once, reserved bool) bool {
	st := s.streamer()
	if st == nil || !isStreamSocket(fd.fd) {
		return false
	}
	if !reserved {
		if s.streams.Add(1) > maxStreams {
			s.streams.Add(-1)
			return false
		}
		defer s.streams.Add(-1)
	}
	// The loop waits in poll(2) when a read would block; a receive timeout
	// left from the Go path would only wake it for nothing.
	syscall.SetsockoptTimeval(fd.fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{})
	var stop atomic.Int32
	// Closing fd would not wake a read blocked on it; shutdown does.
	unblock := context.AfterFunc(ctx, func() { stop.Store(1); fd.shutdown() })
	defer unblock()
	if ctx.Err() != nil {
		// Stopped already: AfterFunc's goroutine may run only after the
		// loop has read a command, which must not be executed.
		stop.Store(1)
	}
	s.streamsServed.Add(1)
	_, err := st.ServeStream(fd.fd, in, s.maxCommandSize()+prefixLen, once, s.opts.RejectLocality4, &stop)
	if err != nil && ctx.Err() == nil && !errors.Is(err, io.EOF) {
		s.log.Debug("data channel closed", "err", err)
	}
	return true
}

// ListenerServer is a TPM that runs a data listener's accept loop and the
// inline phase of each connection (inline.go's policy) itself (*engine.TPM,
// in C: engine/accept.go says why), handing back the connections that go
// on.
type ListenerServer interface {
	// ServeListener serves lfd until a connection goes on elsewhere
	// (fd >= 0, its first bytes in buf[:pending], idle when nothing came
	// after its answer), until timeout or stop (fd < 0, nil), or until
	// accepting fails (an error); accepted counts the connections it took.
	ServeListener(lfd, stopfd int, timeout time.Duration, tcp bool, maxCommand int, rejectLocality4, once bool, stop *atomic.Int32, buf []byte) (fd, pending int, idle bool, accepted uint64, err error)
}

// listenerServer returns the TPM's ListenerServer, or nil when it has
// none, the server is told not to use it, --terminate needs every
// connection's end reported (dataConnEnded), or the process has one P:
// the loop re-enters its cgo call after every hand-off, and each time the
// only P waits in it until sysmon takes it back (up to 10 ms later once
// sysmon has backed off), stalling every goroutine
// (TestReviewGOMAXPROCS1SilentClientsFreezeProcess failed 1 run in 15).
// The drop-in's binaries keep two Ps even on one CPU for this
// (swtpmsocket.TuneRuntime).
func (s *Server) listenerServer() ListenerServer {
	if s.opts.NoStreamLoop || s.opts.TerminateOnDisconnect || runtime.GOMAXPROCS(0) < 2 {
		return nil
	}
	acc, _ := s.tpm.(ListenerServer)
	return acc
}

// serveListenerInC is serveDataInline's accept loop run by the TPM (lfd is
// a duplicate of ln's descriptor that only this goroutine closes). It
// returns to Go for the connections that go on, at every listenerCheck
// (ln closed?) and at the stop.
func (s *Server) serveListenerInC(ctx context.Context, ln net.Listener, lnRaw syscall.RawConn, lfd int, tcp, once bool, acc ListenerServer) error {
	stopfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("serving %s: %w", ln.Addr(), err)
	}
	var stop atomic.Int32
	woken := make(chan struct{})
	wake := context.AfterFunc(ctx, func() {
		defer close(woken)
		stop.Store(1)
		unix.Write(stopfd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		ln.Close()
	})
	// A Listener tells of its Close at once; any other listener is
	// checked every listenerCheck.
	check := listenerCheck
	unhook := func() {}
	if ul, ok := ln.(*Listener); ok {
		check = time.Hour
		unhook = ul.onClose(func() {
			stop.Store(1)
			unix.Write(stopfd, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		})
	}
	defer func() {
		unhook() // under the Listener's lock: no write to stopfd after this
		if !wake() {
			<-woken // it writes stopfd: close it after
		}
		unix.Close(stopfd)
	}()
	// Not counted by Wait (a count could start while a Wait that followed
	// the stop is already waiting): the loop runs no command once stopped,
	// returns at once, and a command it was running holds the engine's
	// lock, which Stop and Close take.
	maxCmd := s.maxCommandSize() + prefixLen
	var pause netaddr.AcceptPause
	for {
		if ctx.Err() != nil {
			return nil
		}
		if lnRaw.Control(func(uintptr) {}) != nil {
			return nil // ln closed
		}
		bufs := s.buffers.Get().(*connBuffers)
		if cap(bufs.in) < maxCmd+prefixLen {
			bufs.in = make([]byte, 0, maxCmd+prefixLen)
		}
		fd, pending, idle, accepted, err := acc.ServeListener(lfd, stopfd, check, tcp, maxCmd, s.opts.RejectLocality4, once, &stop, bufs.in[:cap(bufs.in)])
		if accepted > 0 {
			pause.Reset() // accepting works again: a later failure starts the back-off afresh
		}
		if fd >= 0 {
			s.handOff(ctx, fd, once, bufs, bufs.in[:pending], idle)
			continue
		}
		s.buffers.Put(bufs)
		if err == nil {
			continue // time to check ln, or stopped
		}
		if ctx.Err() != nil {
			return nil
		}
		if !netaddr.Temporary(err) {
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		pause.Wait(s.log, ln.Addr().String(), err)
	}
}

// isStreamSocket reports whether fd is a SOCK_STREAM socket, the only kind
// the C loops serve: their blocking writes are woken by shutdown(2) on
// their own end, which does not hold for a datagram socket whose peer's
// queue is full (a CMD_SET_DATAFD client may pass any socket; such a
// connection is served in Go, which waits in the netpoller).
func isStreamSocket(fd int) bool {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	return err == nil && typ == unix.SOCK_STREAM
}
