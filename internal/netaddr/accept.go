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
	var pause AcceptPause
	for {
		c, err := ln.Accept()
		if err == nil {
			return c, nil
		}
		if !Temporary(err) {
			return nil, err
		}
		pause.Wait(log, ln.Addr().String(), err)
	}
}

// AcceptPause is Accept's pause between retries, for servers that accept
// on a listener's descriptor themselves: Wait logs the error and sleeps
// 5 ms, then twice as long each time up to 1 s; Reset after a success.
type AcceptPause struct{ d time.Duration }

// Wait logs err (log may be nil) and sleeps for the next pause.
func (p *AcceptPause) Wait(log *slog.Logger, listener string, err error) {
	if p.d == 0 {
		p.d = 5 * time.Millisecond
	} else {
		p.d = min(2*p.d, time.Second)
	}
	if log != nil {
		log.Warn("accept failed; retrying", "listener", listener, "err", err, "pause", p.d)
	}
	time.Sleep(p.d)
}

// Reset starts the pauses over after an accepted connection.
func (p *AcceptPause) Reset() { p.d = 0 }

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
