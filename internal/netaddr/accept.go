package netaddr

import (
	"errors"
	"log/slog"
	"net"
	"syscall"
	"time"
)

// Accept waits for the next connection on ln. Errors a server must survive
// — out of descriptors or memory, a connection aborted before it was
// accepted, a timeout — are logged and retried after a pause that grows
// from 5 ms to 1 s (as net/http does), so a flood of connections slows the
// server down instead of ending it. Other errors (ln closed: net.ErrClosed)
// are returned.
func Accept(ln net.Listener, log *slog.Logger) (net.Conn, error) {
	var pause time.Duration
	for {
		c, err := ln.Accept()
		if err == nil {
			return c, nil
		}
		if !Temporary(err) {
			return nil, err
		}
		if pause == 0 {
			pause = 5 * time.Millisecond
		} else {
			pause = min(2*pause, time.Second)
		}
		if log != nil {
			log.Warn("accept failed; retrying", "listener", ln.Addr().String(), "err", err, "pause", pause)
		}
		time.Sleep(pause)
	}
}

// Temporary reports whether an accept error passes: running out of
// descriptors, buffers or memory, an aborted connection, a timeout.
func Temporary(err error) bool {
	for _, e := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.EAGAIN, syscall.EINTR} {
		if errors.Is(err, e) {
			return true
		}
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
