//go:build unix

package tpmrpc

import (
	"context"
	"errors"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// CallPassing is Call with the descriptor fd passed along with req
// (SCM_RIGHTS); the connection must be a unix socket. The receiver holds
// its own copy: the caller still owns fd.
func (c *ConnCaller) CallPassing(ctx context.Context, req []byte, fd int) ([]byte, error) {
	sc, ok := c.conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("tpmrpc: passing a descriptor needs a unix socket")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.out = appendFramed(c.out[:0], req)
	defer clear(c.out)
	var n int
	var serr error
	if err := raw.Write(func(s uintptr) bool {
		n, serr = unix.SendmsgN(int(s), c.out, unix.UnixRights(fd), nil, 0)
		return serr != unix.EAGAIN
	}); err != nil {
		serr = err
	}
	if serr == nil && n < len(c.out) {
		_, serr = c.conn.Write(c.out[n:])
	}
	if serr != nil {
		c.conn.Close()
		return nil, fmt.Errorf("passing a descriptor: %w", serr)
	}
	return c.reply()
}
