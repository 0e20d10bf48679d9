package swtpmproto

import (
	"context"
	"net"
	"syscall"
)

// Serving a data connection with blocking read/write on its own descriptor
// avoids the Go netpoller's park/wake-up per command, which costs more than
// libtpms itself for small commands (DESIGN.md section 7).

// fdConn does blocking I/O on a duplicated socket descriptor.
type fdConn int

func (f fdConn) Read(b []byte) (int, error) {
	for {
		n, err := syscall.Read(int(f), b)
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 && len(b) > 0 {
			return 0, errEOF
		}
		return n, nil
	}
}

func (f fdConn) Write(b []byte) (int, error) {
	total := 0
	for total < len(b) {
		n, err := syscall.Write(int(f), b[total:])
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return total, err
		}
		total += n
	}
	return total, nil
}

// blockingFD duplicates c's descriptor in blocking mode, or returns false.
// The original connection must not be used for I/O afterwards (O_NONBLOCK
// is shared by both descriptors).
func blockingFD(c net.Conn) (int, bool) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1, false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1, false
	}
	fd := -1
	raw.Control(func(orig uintptr) {
		if d, err := syscall.Dup(int(orig)); err == nil {
			syscall.CloseOnExec(d)
			fd = d
		}
	})
	if fd < 0 {
		return -1, false
	}
	if err := syscall.SetNonblock(fd, false); err != nil {
		syscall.Close(fd)
		return -1, false
	}
	return fd, true
}

// handleDataConn serves the data channel on c, with blocking I/O when possible.
func (s *Server) handleDataConn(ctx context.Context, c net.Conn, once bool) {
	fd, ok := blockingFD(c)
	if !ok {
		s.HandleData(ctx, c, once)
		return
	}
	defer syscall.Close(fd)
	// Closing c would not wake a read blocked on the duplicate; shutdown does.
	stop := context.AfterFunc(ctx, func() { syscall.Shutdown(fd, syscall.SHUT_RDWR) })
	defer stop()
	s.HandleData(ctx, fdConn(fd), once)
}
