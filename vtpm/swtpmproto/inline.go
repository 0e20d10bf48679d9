package swtpmproto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"cvtpm/internal/netaddr"
)

// Connection-per-command clients without a goroutine per connection.
//
// tpm2-tss's swtpm TCTI opens a data connection for every command. Served
// through net.Listener, each such connection cost a netpoller wake-up of the
// accepting goroutine, getsockname and an epoll registration for the new
// socket, a new goroutine (and, with idle Ps, a thread woken to run it), and
// a second park in the netpoller until the client closed: about twice
// swtpm's poll/accept/read/write/read/close. serveDataInline accepts on a
// duplicate of the listener's descriptor, so the netpoller waits for the
// listener only, and answers a connection's first command on the accepting
// goroutine. Its waits there are ppoll(2) calls on the connection and the
// listener together, in a normal (P-releasing) system call with a
// high-resolution timeout: the inline phase ends after inlineBudget, or as
// soon as another connection is waiting, and the connection is handed to a
// goroutine of its own (the blocking-descriptor connection of fdio.go). A
// connection that closes after its answer never leaves the accepting
// goroutine; a silent or trickling one delays others by nothing while they
// queue, and by at most inlineBudget otherwise.

// inlineBudget bounds the time the accepting goroutine waits for one
// connection's bytes (its first command, then its close). SO_RCVTIMEO is
// not used for this: the kernel rounds it up to whole scheduler ticks
// (8 ms measured for 2 ms on this project's VMs).
const inlineBudget = 2 * time.Millisecond

// errHandOff ends the inline phase: the connection continues on a
// goroutine of its own.
var errHandOff = errors.New("serve the connection on its own goroutine")

// listenerCheck is how often an idle accept loop checks whether its
// listener was closed (ServeData's callers stop it with ctx; a closed
// listener ends it too, as it always did).
const listenerCheck = 500 * time.Millisecond

// serveDataInline is ServeData on a listener whose descriptor it can
// accept on; ok is false (and nothing was done) for any other listener.
func (s *Server) serveDataInline(ctx context.Context, ln net.Listener, once bool) (ok bool, err error) {
	if acc := s.listenerServer(); acc != nil {
		// A plain duplicate: as an *os.File it would be registered with
		// the netpoller, which every connection would then wake.
		if lfd, lnRaw, err := dupListener(ln); err == nil {
			defer syscall.Close(lfd)
			if isStreamSocket(lfd) {
				return true, s.serveListenerInC(ctx, ln, lnRaw, lfd, ln.Addr().Network() == "tcp", once, acc)
			}
		}
	}
	lnFile, lfd, err := listenerFile(ln)
	if err != nil {
		return false, nil
	}
	// Only this goroutine closes lnFile, so lfd stays this listener's
	// number while connections are polled with it. A stop wakes the wait
	// through the deadline.
	defer lnFile.Close()
	raw, err := lnFile.SyscallConn()
	if err != nil {
		return false, nil
	}
	lnRaw, err := ln.(syscall.Conn).SyscallConn()
	if err != nil {
		return false, nil
	}
	tcp := ln.Addr().Network() == "tcp"
	stop := context.AfterFunc(ctx, func() { lnFile.SetReadDeadline(time.Unix(1, 0)); ln.Close() })
	defer stop()
	var pause netaddr.AcceptPause
	nextCheck := time.Now().Add(listenerCheck)
	for {
		// The closed-listener check runs on a fixed schedule, so a client
		// that keeps connecting cannot put it off.
		if now := time.Now(); !now.Before(nextCheck) {
			if lnRaw.Control(func(uintptr) {}) != nil {
				return true, nil // ln closed
			}
			nextCheck = now.Add(listenerCheck)
		}
		lnFile.SetReadDeadline(nextCheck)
		if ctx.Err() != nil {
			return true, nil
		}
		fd, acceptErr := -1, error(nil)
		err := raw.Read(func(lfd uintptr) bool {
			// Without SOCK_NONBLOCK: a handed-off connection is read with
			// blocking, time-bounded reads (fdio.go).
			fd, _, acceptErr = syscall.Accept4(int(lfd), syscall.SOCK_CLOEXEC)
			return acceptErr != syscall.EAGAIN
		})
		if errors.Is(err, os.ErrDeadlineExceeded) {
			continue // stopped, or time to check ln
		}
		if err != nil {
			if ctx.Err() != nil {
				return true, nil
			}
			return true, fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		if acceptErr != nil {
			if !netaddr.Temporary(acceptErr) {
				return true, fmt.Errorf("accept on %s: %w", ln.Addr(), acceptErr)
			}
			pause.Wait(s.log, ln.Addr().String(), acceptErr)
			continue
		}
		pause.Reset()
		if tcp {
			// Answers go out at once, as net sets for its connections.
			syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
		}
		s.conns.Add(1) // Wait covers commands run here too
		s.serveFirstCommand(ctx, fd, lfd, once)
		s.conns.Done()
	}
}

// listenerFile is a duplicate of ln's descriptor as an *os.File, whose
// SyscallConn, unlike a listener's, can wait in the netpoller for a
// connection to accept, and the duplicate's number.
func listenerFile(ln net.Listener) (*os.File, int, error) {
	dup, _, err := dupListener(ln)
	if err != nil {
		return nil, -1, err
	}
	// The duplicate shares the listener's O_NONBLOCK, so os.NewFile
	// registers it with the netpoller.
	return os.NewFile(uintptr(dup), "data listener"), dup, nil
}

// dupListener duplicates ln's descriptor (close-on-exec) and returns it
// with ln's RawConn.
func dupListener(ln net.Listener) (int, syscall.RawConn, error) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return -1, nil, errors.New("listener has no descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, nil, err
	}
	dup, dupErr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) {
		dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return -1, nil, err
	}
	if dupErr != nil {
		return -1, nil, dupErr
	}
	return dup, raw, nil
}

// serveFirstCommand answers fd's first command on the calling goroutine and
// closes fd when the client closes right after; otherwise fd, with any
// bytes already read, goes to a goroutine of its own. lfd is the listener,
// polled beside fd so that a waiting connection ends the inline phase.
func (s *Server) serveFirstCommand(ctx context.Context, fd, lfd int, once bool) {
	bufs := s.buffers.Get().(*connBuffers)
	in := bufs.in[:0]
	r := &inlineReader{fd: fd, lfd: lfd, deadline: time.Now().Add(inlineBudget)}
	f, err := readFrame(r, &in, s.maxCommandSize()+prefixLen)
	if errors.Is(err, errHandOff) {
		s.handOff(ctx, fd, once, bufs, in, len(in) == 0)
		return
	}
	if err != nil {
		if !errors.Is(err, io.EOF) {
			s.log.Debug("data channel closed", "err", err)
		}
		s.endInline(ctx, fd, bufs, in)
		return
	}
	if ctx.Err() != nil { // stopped while the command arrived
		s.endInline(ctx, fd, bufs, in)
		return
	}
	bufs.out = s.answer(bufs.out[:0], in, f)
	if _, err := (fdConn{fd: fd}).Write(bufs.out); err != nil {
		s.log.Debug("data channel write failed", "err", err)
		s.endInline(ctx, fd, bufs, in)
		return
	}
	n := copy(in, in[f.End:])
	in = in[:n]
	if once {
		s.endInline(ctx, fd, bufs, in)
		return
	}
	if n > 0 { // pipelined
		s.handOff(ctx, fd, once, bufs, in, false)
		return
	}
	// A connection-per-command client closes now: wait (bounded) for it.
	// It has not closed yet (it is reading the answer), so poll first.
	r.deadline, r.pollFirst, r.reads = time.Now().Add(inlineBudget), true, 0
	m, err := r.Read(in[:cap(in)])
	switch {
	case errors.Is(err, io.EOF):
		s.endInline(ctx, fd, bufs, in)
	case errors.Is(err, errHandOff):
		s.handOff(ctx, fd, once, bufs, in, true)
	case err != nil:
		s.log.Debug("data channel closed", "err", err)
		s.endInline(ctx, fd, bufs, in)
	default:
		s.handOff(ctx, fd, once, bufs, in[:m], false)
	}
}

// endInline closes a connection served inline.
func (s *Server) endInline(ctx context.Context, fd int, bufs *connBuffers, in []byte) {
	syscall.Close(fd)
	bufs.in, bufs.out = in[:0], bufs.out[:0]
	s.buffers.Put(bufs)
	s.dataConnEnded(ctx)
}

// handOff serves fd, whose first bytes are in, on a goroutine of its own
// with blocking reads (idle waits in the netpoller) until it closes. An
// idle connection (nothing arrived within the inline phase) starts in the
// netpoller rather than in a blocking read.
func (s *Server) handOff(ctx context.Context, fd int, once bool, bufs *connBuffers, in []byte, idle bool) {
	if idle {
		// Nothing to carry over: wait in the netpoller as a net.Conn (one
		// descriptor while the client stays silent), as every connection
		// did before the inline phase (lazyConn).
		s.buffers.Put(bufs)
		f := os.NewFile(uintptr(fd), "data connection")
		c, err := net.FileConn(f) // a duplicate, non-blocking, in the netpoller
		f.Close()
		if err != nil {
			s.log.Debug("data connection dropped", "err", err)
			s.dataConnEnded(ctx)
			return
		}
		s.handOffs.Add(1)
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			defer c.Close()
			unblock := context.AfterFunc(ctx, func() { c.Close() })
			defer unblock()
			s.handleDataConn(ctx, c, once, false)
		}()
		return
	}
	// fdConn's blocking reads are bounded by the receive timeout (lazyConn
	// sets its own when it switches).
	tv := syscall.Timeval{Usec: fastReadWindow}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		s.log.Debug("data connection dropped", "err", err)
		s.endInline(ctx, fd, bufs, in)
		return
	}
	s.handOffs.Add(1)
	s.conns.Add(1)
	go func() {
		defer s.conns.Done()
		conn := &ownedFD{fd: fd}
		if s.serveStream(ctx, conn, in, once, false) {
			bufs.in, bufs.out = in[:0], bufs.out[:0]
			s.buffers.Put(bufs)
		} else {
			stop := context.AfterFunc(ctx, conn.shutdown)
			s.handleData(ctx, fdConn{fd: fd}, once, bufs, in)
			stop()
		}
		conn.close()
		s.dataConnEnded(ctx)
	}()
}

// dataConnEnded applies --terminate when a data connection ends by itself.
func (s *Server) dataConnEnded(ctx context.Context) {
	if s.opts.TerminateOnDisconnect && ctx.Err() == nil {
		s.log.Info("data client disconnected; terminating (--terminate)")
		s.requestShutdown()
	}
}

// inlineReader reads a connection in the inline phase: without blocking,
// waiting in ppoll until deadline; a wait that times out or sees another
// connection waiting on lfd ends it with errHandOff.
type inlineReader struct {
	fd, lfd   int
	deadline  time.Time
	pollFirst bool // the next read waits first (the peer is known not to have written)
	reads     int  // reads that returned bytes
}

func (r *inlineReader) Read(b []byte) (int, error) {
	// A command that needs more than one read is arriving in pieces: it
	// goes on on its own goroutine as soon as another connection waits.
	if r.reads > 0 && listenerWaiting(r.lfd) && !peerClosed(r.fd) {
		return 0, errHandOff
	}
	for {
		if r.pollFirst {
			r.pollFirst = false
			if err := r.wait(); err != nil {
				return 0, err
			}
		}
		if !r.deadline.After(time.Now()) {
			return 0, errHandOff // a client trickling its bytes
		}
		n, err := recvNow(r.fd, b)
		switch err {
		case nil:
			if n == 0 && len(b) > 0 {
				return 0, io.EOF
			}
			r.reads++
			return n, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			r.pollFirst = true
		default:
			return 0, err
		}
	}
}

// wait returns nil once fd is readable (or has hung up), errHandOff when
// the deadline passes or a connection waits on lfd.
func (r *inlineReader) wait() error {
	for {
		left := time.Until(r.deadline)
		if left <= 0 {
			return errHandOff
		}
		fds := [2]unix.PollFd{{Fd: int32(r.fd), Events: unix.POLLIN}, {Fd: int32(r.lfd), Events: unix.POLLIN}}
		ts := unix.NsecToTimespec(left.Nanoseconds())
		n, err := unix.Ppoll(fds[:], &ts, nil)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return err
		case n == 0: // out of time
			return errHandOff
		case fds[1].Revents != 0: // another connection waits
			if fds[0].Revents != 0 && peerClosed(r.fd) {
				return nil // let the read see the end: closing here is cheaper
			}
			return errHandOff
		default:
			return nil
		}
	}
}

// listenerWaiting reports whether a connection waits on lfd (a ppoll
// that does not wait).
func listenerWaiting(lfd int) bool {
	fds := [1]unix.PollFd{{Fd: int32(lfd), Events: unix.POLLIN}}
	var zero unix.Timespec
	n, err := unix.Ppoll(fds[:], &zero, nil)
	return err == nil && n > 0
}

// peerClosed reports whether fd's next read is the end of the stream.
func peerClosed(fd int) bool {
	var b [1]byte
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), 1,
		syscall.MSG_DONTWAIT|syscall.MSG_PEEK, 0, 0)
	return e == 0 && n == 0
}

// recvNow is recv(2) with MSG_DONTWAIT: it never blocks, so it needs none
// of the runtime's system call bookkeeping.
func recvNow(fd int, b []byte) (int, error) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(unsafe.SliceData(b))
	}
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, uintptr(fd), uintptr(p), uintptr(len(b)), syscall.MSG_DONTWAIT, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// ownedFD is a descriptor that one goroutine closes while another may shut
// it down (to wake a blocked read when the server stops): the shutdown
// never reaches a descriptor number that close has released and the
// process may have reused.
type ownedFD struct {
	mu     sync.Mutex
	fd     int
	closed bool
}

func (o *ownedFD) shutdown() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.closed {
		syscall.Shutdown(o.fd, syscall.SHUT_RDWR)
	}
}

func (o *ownedFD) close() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.closed {
		o.closed = true
		syscall.Close(o.fd)
	}
}
