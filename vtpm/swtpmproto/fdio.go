package swtpmproto

import (
	"context"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Serving a busy data connection with a blocking read on its descriptor
// avoids the Go netpoller's park/wake-up per command, which costs more than
// libtpms itself for small commands (DESIGN.md section 7). The original
// net.Conn is closed once the duplicate exists, so the socket leaves the
// netpoller's epoll set and incoming commands wake nothing else. A blocked
// read holds one of the runtime's Ps, though, so it is bounded by a receive
// timeout: an idle connection waits in the netpoller through a temporary
// registration, then returns to blocking reads.

// fastReadWindow bounds a blocking read; commands arriving within it are
// picked up without a netpoller round trip. It is a receive timeout, which
// the kernel rounds up to whole scheduler ticks: 2 ms asked gives about
// 8 ms on this project's VMs (HZ=250), and a goroutine waiting for a kept
// connection's next command holds its P that long before it parks. With
// GOMAXPROCS=1 other goroutines wait as long; the inline phase of a new
// connection (inline.go) does not use it.
const fastReadWindow = 2000 // microseconds

// fdConn reads and writes a duplicate of a socket's descriptor.
type fdConn struct {
	fd int
}

func (f fdConn) Read(b []byte) (int, error) {
	for {
		n, err := rawRead(f.fd, b)
		switch err {
		case nil:
			if n == 0 && len(b) > 0 {
				return 0, errEOF
			}
			return n, nil
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return f.waitRead(b)
		default:
			return 0, err
		}
	}
}

// waitRead parks in the netpoller until data arrives (the connection went
// idle), then returns to blocking reads.
func (f fdConn) waitRead(b []byte) (int, error) {
	nc, done, err := f.inPoller()
	if err != nil {
		return 0, err
	}
	defer done()
	n, err := nc.Read(b)
	if err == io.EOF {
		return 0, errEOF
	}
	return n, err
}

// inPoller registers a duplicate of f's descriptor with the netpoller for
// one wait; done closes it and puts the descriptor back in blocking mode.
func (f fdConn) inPoller() (nc net.Conn, done func(), err error) {
	d, err := syscall.Dup(f.fd)
	if err != nil {
		return nil, nil, err
	}
	file := os.NewFile(uintptr(d), "poller-wait")
	nc, err = net.FileConn(file) // a further duplicate, non-blocking
	file.Close()
	if err != nil {
		return nil, nil, err
	}
	return nc, func() {
		nc.Close()
		// O_NONBLOCK belongs to the shared open file description: restore it.
		syscall.SetNonblock(f.fd, false)
	}, nil
}

// Write sends without blocking (MSG_DONTWAIT); when the client does not
// read and its socket buffer is full, it waits in the netpoller (waitWrite)
// rather than in write(2), which would pin an OS thread per such client.
func (f fdConn) Write(b []byte) (int, error) {
	total := 0
	for total < len(b) {
		n, err := sendNow(f.fd, b[total:])
		switch err {
		case nil:
			total += n
		case syscall.EINTR:
		case syscall.EAGAIN:
			n, err := f.waitWrite(b[total:])
			return total + n, err
		default:
			return total, err
		}
	}
	return total, nil
}

// sendNow is send(2) with MSG_DONTWAIT (and MSG_NOSIGNAL: a closed peer
// is an EPIPE error, not a signal); it never blocks.
func sendNow(fd int, b []byte) (int, error) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)),
		syscall.MSG_DONTWAIT|syscall.MSG_NOSIGNAL, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// waitWrite writes b through a temporary netpoller registration, as
// waitRead reads.
func (f fdConn) waitWrite(b []byte) (int, error) {
	nc, done, err := f.inPoller()
	if err != nil {
		return 0, err
	}
	defer done()
	return nc.Write(b)
}

// blockingFD duplicates c's descriptor in blocking mode with a bounded
// receive timeout and closes c, or returns false (c still open).
func blockingFD(c net.Conn) (fdConn, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fdConn{}, false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return fdConn{}, false
	}
	fd := -1
	raw.Control(func(orig uintptr) {
		if d, err := syscall.Dup(int(orig)); err == nil {
			syscall.CloseOnExec(d)
			fd = d
		}
	})
	if fd < 0 {
		return fdConn{}, false
	}
	tv := syscall.Timeval{Usec: fastReadWindow}
	if syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv) != nil ||
		syscall.SetNonblock(fd, false) != nil {
		syscall.Close(fd)
		return fdConn{}, false
	}
	c.Close() // leave the netpoller: it would be woken by every command
	return fdConn{fd: fd}, true
}

// lazyConn starts on the netpoller and switches to a blocking duplicate
// once the connection has shown it carries more than one command, so
// connection-per-command clients (tpm2-tss's swtpm TCTI) pay no set-up.
type lazyConn struct {
	ctx   context.Context
	c     net.Conn
	f     fdConn
	owned *ownedFD
	fast  bool
	reads int
	stop  func() bool

	reserved bool // needs no Streamer slot (the CMD_SET_DATAFD connection)
	tried    bool // stream was tried
}

func (l *lazyConn) Read(b []byte) (int, error) {
	if !l.fast && l.reads >= 2 {
		l.toBlocking()
	}
	l.reads++
	if l.fast {
		return l.f.Read(b)
	}
	return l.c.Read(b)
}

// toBlocking moves the connection to a blocking duplicate of its
// descriptor (or leaves it on the netpoller if it cannot).
func (l *lazyConn) toBlocking() {
	if f, ok := blockingFD(l.c); ok {
		l.f, l.owned, l.fast = f, &ownedFD{fd: f.fd}, true
		// Closing c would not wake a read blocked on the duplicate; shutdown does.
		l.stop = context.AfterFunc(l.ctx, l.owned.shutdown)
	}
}

// stream hands the connection, whose next bytes are in, to the TPM's
// Streamer once it has answered a command and stays open; it reports
// whether the connection was served to its end there. It is tried once.
func (l *lazyConn) stream(s *Server, in []byte) bool {
	if l.tried || l.fast || s.streamer() == nil {
		return false
	}
	l.tried = true
	l.toBlocking()
	if !l.fast {
		return false
	}
	return s.serveStream(l.ctx, l.owned, in, false, l.reserved)
}

func (l *lazyConn) Write(b []byte) (int, error) {
	if l.fast {
		return l.f.Write(b)
	}
	return l.c.Write(b)
}

func (l *lazyConn) close() {
	if l.fast {
		l.stop()
		l.owned.close()
	}
}

// HandleDataConn serves the data channel on c, a connection the server
// did not accept (swtpm's --server ...,clientfd=), until it ends; with the
// engine, in its C loop after the first command, as an accepted one.
func (s *Server) HandleDataConn(ctx context.Context, c net.Conn) {
	s.handleDataConn(ctx, c, false, true)
}

// handleDataConn serves the data channel on c, switching to blocking I/O,
// or to the TPM's own loop (stream.go), when it carries a stream of
// commands. reserved says it needs no Streamer slot.
func (s *Server) handleDataConn(ctx context.Context, c net.Conn, once, reserved bool) {
	l := &lazyConn{ctx: ctx, c: c, reserved: reserved}
	defer l.close()
	s.HandleData(ctx, l, once)
	s.dataConnEnded(ctx)
}

// rawRead is read(2) without the runtime's syscall bookkeeping. A read
// that waits for the client's next command outlasts the 20 us after which
// sysmon takes the P away from a goroutine in a syscall; getting a P back
// then costs more than libtpms spends on a small command (measured: raw
// GetRandom 18 -> 15 us, PCR_Extend 48 -> 33 us). Holding the P is bounded
// by the descriptor's receive timeout (fastReadWindow), after which the
// connection waits in the netpoller, so neither other goroutines nor a
// stop-the-world wait longer than that. Writes keep syscall.Write: they do
// not wait for the peer unless its buffer is full, and then must not hold a P.
//
//go:noinline
func rawRead(fd int, b []byte) (int, error) {
	r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
