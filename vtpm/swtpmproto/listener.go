package swtpmproto

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Listener is a listening socket kept out of the Go runtime's netpoller.
// ServeData on a TPM that is a ListenerServer accepts on it in C; a
// net.Listener would stay registered with the netpoller meanwhile, and
// every connection that arrives would wake a runtime thread blocked in
// epoll_pwait for nothing (two epoll_pwait calls and a context switch per
// connection, about half of what separated a connection per command from
// swtpm's). Accept works too: the first call registers a duplicate.
type Listener struct {
	mu     sync.Mutex
	fd     int // -1 once closed
	addr   net.Addr
	unlink string           // a unix socket's path, removed by Close
	polled net.Listener     // the duplicate Accept uses, made on its first call
	closed map[*func()]bool // tell ServeData's C loops of a Close (onClose)
}

// onClose has f called (under the Listener's lock) when l is closed, or
// at once if it is closed already, until remove is called (also under the
// lock: f is not called after remove returns). Each ServeData's C accept
// loop registers one, and then needs no timer to notice a Close.
func (l *Listener) onClose(f func()) (remove func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		f()
		return func() {}
	}
	if l.closed == nil {
		l.closed = make(map[*func()]bool)
	}
	l.closed[&f] = true
	return func() {
		l.mu.Lock()
		delete(l.closed, &f)
		l.mu.Unlock()
	}
}

// Unpolled moves ln's socket into a Listener and closes ln (without
// removing a unix socket's file). unlink, if not empty, is the path Close
// removes (not a name in the abstract namespace, "@...", which has none).
func Unpolled(ln net.Listener, unlink string) (*Listener, error) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return nil, errors.New("swtpmproto: listener has no descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd, dupErr := -1, error(nil)
	if err := raw.Control(func(orig uintptr) { fd, dupErr = unix.FcntlInt(orig, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, fmt.Errorf("swtpmproto: duplicating the listener: %w", dupErr)
	}
	if ul, ok := ln.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false)
	}
	if strings.HasPrefix(unlink, "@") {
		unlink = "" // an abstract socket: no file to remove
	}
	l := &Listener{fd: fd, addr: ln.Addr(), unlink: unlink}
	ln.Close()
	return l, nil
}

// Accept waits for and returns the next connection, through the netpoller.
func (l *Listener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fd < 0 {
		l.mu.Unlock()
		return nil, net.ErrClosed
	}
	if l.polled == nil {
		d, err := unix.FcntlInt(uintptr(l.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			l.mu.Unlock()
			return nil, err
		}
		f := os.NewFile(uintptr(d), "listener")
		l.polled, err = net.FileListener(f)
		f.Close()
		if err != nil {
			l.mu.Unlock()
			return nil, err
		}
	}
	polled := l.polled
	l.mu.Unlock()
	return polled.Accept()
}

// Close stops accepting: the socket closes once ServeData, which holds a
// duplicate, has returned (at once).
func (l *Listener) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.fd < 0 {
		return net.ErrClosed
	}
	unix.Close(l.fd)
	l.fd = -1
	for f := range l.closed {
		(*f)()
	}
	l.closed = nil
	if l.polled != nil {
		l.polled.Close()
	}
	if l.unlink != "" {
		os.Remove(l.unlink)
	}
	return nil
}

// Addr returns the listener's address.
func (l *Listener) Addr() net.Addr { return l.addr }

// SyscallConn gives the descriptor to Control (which fails once the
// listener is closed); Read and Write are not supported.
func (l *Listener) SyscallConn() (syscall.RawConn, error) { return listenerRaw{l}, nil }

type listenerRaw struct{ l *Listener }

func (r listenerRaw) Control(f func(fd uintptr)) error {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	if r.l.fd < 0 {
		return net.ErrClosed
	}
	f(uintptr(r.l.fd))
	return nil
}

func (listenerRaw) Read(func(fd uintptr) bool) error  { return errors.ErrUnsupported }
func (listenerRaw) Write(func(fd uintptr) bool) error { return errors.ErrUnsupported }
