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
// swtpm's poll/accept/read/write/read/close. serveDataInline accepts on the
// listener's descriptor itself, so the netpoller waits for the listener
// only, and answers a connection's first command on the accepting
// goroutine with blocking reads bounded by the receive timeout
// (fastReadWindow). A connection that closes after its answer never leaves
// that goroutine; one that keeps talking, or is slow to send or to close,
// is handed to a goroutine of its own (the blocking-descriptor connection
// of fdio.go), so one client delays another's accept by at most a few
// bounded reads.

// maxInlineReads bounds the reads the accepting goroutine spends on a
// connection's first command before handing it off: a client that trickles
// its command byte by byte cannot hold the listener for longer than this
// many receive timeouts.
const maxInlineReads = 4

// errHandOff ends the inline phase: the connection continues on a
// goroutine of its own.
var errHandOff = errors.New("serve the connection on its own goroutine")

// serveDataInline is ServeData on a listener whose descriptor it can
// accept on; ok is false (and nothing was done) for any other listener.
func (s *Server) serveDataInline(ctx context.Context, ln net.Listener, once bool) (ok bool, err error) {
	lnFile, err := listenerFile(ln)
	if err != nil {
		return false, nil
	}
	defer lnFile.Close()
	raw, err := lnFile.SyscallConn()
	if err != nil {
		return false, nil
	}
	tcp := ln.Addr().Network() == "tcp"
	stop := context.AfterFunc(ctx, func() { lnFile.Close(); ln.Close() })
	defer stop()
	var pause netaddr.AcceptPause
	for {
		fd, acceptErr := -1, error(nil)
		err := raw.Read(func(lfd uintptr) bool {
			// Without SOCK_NONBLOCK: the connection is read with blocking,
			// time-bounded reads and never joins the netpoller unless idle.
			fd, _, acceptErr = syscall.Accept4(int(lfd), syscall.SOCK_CLOEXEC)
			return acceptErr != syscall.EAGAIN
		})
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
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
		if err := prepareAccepted(fd, tcp); err != nil {
			s.log.Debug("data connection refused", "err", err)
			syscall.Close(fd)
			continue
		}
		s.conns.Add(1) // Wait covers commands run here too
		s.serveFirstCommand(ctx, fd, once)
		s.conns.Done()
	}
}

// listenerFile is a duplicate of ln's descriptor as an *os.File, whose
// SyscallConn, unlike a listener's, can wait in the netpoller for a
// connection to accept.
func listenerFile(ln net.Listener) (*os.File, error) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return nil, errors.New("listener has no descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup, dupErr := -1, error(nil)
	if err := raw.Control(func(fd uintptr) {
		dup, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, dupErr
	}
	// The duplicate shares the listener's O_NONBLOCK, so os.NewFile
	// registers it with the netpoller.
	return os.NewFile(uintptr(dup), "data listener"), nil
}

// prepareAccepted bounds a blocking read on an accepted connection by the
// receive timeout and, on TCP, sends answers without delay (as net does).
func prepareAccepted(fd int, tcp bool) error {
	tv := syscall.Timeval{Usec: fastReadWindow}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	if tcp {
		return syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	}
	return nil
}

// serveFirstCommand answers fd's first command on the calling goroutine and
// closes fd when the client closes right after; otherwise fd, with any
// bytes already read, goes to a goroutine of its own.
func (s *Server) serveFirstCommand(ctx context.Context, fd int, once bool) {
	bufs := s.buffers.Get().(*connBuffers)
	in := bufs.in[:0]
	f, err := readFrame(&inlineReader{fd: fd}, &in, s.maxCommandSize()+prefixLen)
	if errors.Is(err, errHandOff) {
		s.handOff(ctx, fd, once, bufs, in)
		return
	}
	if err != nil {
		if !errors.Is(err, io.EOF) {
			s.log.Debug("data channel closed", "err", err)
		}
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
	if n == 0 {
		// A connection-per-command client closes now: wait (bounded) for it.
		m, err := (&inlineReader{fd: fd}).Read(in[:cap(in)])
		switch {
		case errors.Is(err, io.EOF):
			s.endInline(ctx, fd, bufs, in)
			return
		case err != nil && !errors.Is(err, errHandOff):
			s.log.Debug("data channel closed", "err", err)
			s.endInline(ctx, fd, bufs, in)
			return
		}
		in = in[:m]
	}
	s.handOff(ctx, fd, once, bufs, in)
}

// endInline closes a connection served inline.
func (s *Server) endInline(ctx context.Context, fd int, bufs *connBuffers, in []byte) {
	syscall.Close(fd)
	bufs.in, bufs.out = in[:0], bufs.out[:0]
	s.buffers.Put(bufs)
	s.dataConnEnded(ctx)
}

// handOff serves fd, whose first bytes are in, on a goroutine of its own
// with blocking reads (idle waits in the netpoller) until it closes.
func (s *Server) handOff(ctx context.Context, fd int, once bool, bufs *connBuffers, in []byte) {
	s.handOffs.Add(1)
	s.conns.Add(1)
	go func() {
		defer s.conns.Done()
		conn := &ownedFD{fd: fd}
		stop := context.AfterFunc(ctx, conn.shutdown)
		s.handleData(ctx, fdConn{fd: fd}, once, bufs, in)
		stop()
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

// inlineReader reads a blocking descriptor for the inline phase: a read
// that times out, or one beyond maxInlineReads, ends it with errHandOff.
type inlineReader struct {
	fd    int
	reads int
}

func (r *inlineReader) Read(b []byte) (int, error) {
	if r.reads == maxInlineReads {
		return 0, errHandOff
	}
	r.reads++
	for {
		n, err := rawRead(r.fd, b)
		switch err {
		case nil:
			if n == 0 && len(b) > 0 {
				return 0, io.EOF
			}
			return n, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, errHandOff
		default:
			return 0, err
		}
	}
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
