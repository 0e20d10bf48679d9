package netaddr

import (
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Limits bounds the connections one listener holds at once: Max in all,
// MaxPerSource from one source (an IP address, a vsock CID). Beyond them a
// new connection is closed at once and logged (once per source per
// 10 seconds, so a flood does not fill the log), so one client cannot take
// the descriptors every other client needs.
type Limits struct {
	Max, MaxPerSource int
	Name              string // what the log calls the listener
	Log               *slog.Logger

	mu     sync.Mutex
	active map[string]int
	total  int
	logged map[string]time.Time
}

// Source names a connection's origin: its address without the port, an
// IPv6 address by its /64 (the block one site gets, so one client cannot
// pass for thousands), for vsock the CID.
func Source(c net.Conn) string {
	a := c.RemoteAddr().String()
	if host, _, err := net.SplitHostPort(a); err == nil {
		return sourceKey(host)
	}
	if i := strings.LastIndexByte(a, ':'); i > 0 { // vsock "vm(3):1234"
		return a[:i]
	}
	return a
}

// sourceKey is src, or for an IPv6 address its /64.
func sourceKey(src string) string {
	if ip := net.ParseIP(src); ip != nil && ip.To4() == nil {
		return ip.Mask(net.CIDRMask(64, 128)).String() + "/64"
	}
	return src
}

// Admit counts a connection from src, or reports false (and logs) when a
// cap is reached.
func (l *Limits) Admit(src string) bool {
	src = sourceKey(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.active == nil {
		l.active, l.logged = map[string]int{}, map[string]time.Time{}
	}
	if (l.MaxPerSource > 0 && l.active[src] >= l.MaxPerSource) || (l.Max > 0 && l.total >= l.Max) {
		if now := time.Now(); l.Log != nil && now.Sub(l.logged[src]) > 10*time.Second {
			if len(l.logged) > 4096 {
				clear(l.logged)
			}
			l.logged[src] = now
			l.Log.Warn("too many connections: refused", "listener", l.Name, "from", src,
				"from_source", l.active[src], "in_all", l.total, "max_per_source", l.MaxPerSource, "max", l.Max)
		}
		return false
	}
	l.active[src]++
	l.total++
	return true
}

// Release returns a connection Admit counted.
func (l *Limits) Release(src string) {
	src = sourceKey(src)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.active[src]--; l.active[src] <= 0 {
		delete(l.active, src)
	}
	l.total--
}

// Listen wraps ln: its Accept survives temporary errors (see Accept) and
// closes connections beyond the limits; an accepted connection releases
// its count when closed. For servers that run their own accept loop
// (gRPC, net/http).
func (l *Limits) Listen(ln net.Listener) net.Listener { return &limitedListener{Listener: ln, l: l} }

type limitedListener struct {
	net.Listener
	l *Limits
}

func (ll *limitedListener) Accept() (net.Conn, error) {
	for {
		c, err := Accept(ll.Listener, ll.l.Log)
		if err != nil {
			return nil, err
		}
		src := Source(c)
		if !ll.l.Admit(src) {
			c.Close()
			continue
		}
		return &limitedConn{Conn: c, release: sync.OnceFunc(func() { ll.l.Release(src) })}, nil
	}
}

type limitedConn struct {
	net.Conn
	release func()
}

// SyscallConn gives the socket's descriptor (the backend hands a link
// session's socket to a worker, internal/attestedlink).
func (c *limitedConn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("%T has no descriptor", c.Conn)
	}
	return sc.SyscallConn()
}

func (c *limitedConn) Close() error {
	c.release()
	return c.Conn.Close()
}
