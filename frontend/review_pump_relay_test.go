package frontend

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

func rvFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func rvStatus(t *testing.T, key string) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, key+":") {
			f := strings.Fields(l[len(key)+1:])
			n, _ := strconv.Atoi(f[0])
			return n
		}
	}
	t.Fatalf("no %s in /proc/self/status", key)
	return 0
}

func rvCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rvRelay starts a Relay in front of a backend whose connections are
// handed to handle; it returns the relay's address and a stop function
// that cancels Serve and waits for it.
func rvRelay(t *testing.T, handle func(net.Conn)) (string, func() error) {
	return rvRelayTo(t, "tcp", handle)
}

func rvRelayTo(t *testing.T, network string, handle func(net.Conn), tap ...io.Writer) (string, func() error) {
	t.Helper()
	var back net.Listener
	var err error
	if network == "unix" {
		back, err = net.Listen("unix", t.TempDir()+"/backend.sock")
	} else {
		back, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		t.Fatal(err)
	}
	var bwg sync.WaitGroup
	go func() {
		for {
			c, err := back.Accept()
			if err != nil {
				return
			}
			bwg.Add(1)
			go func() { defer bwg.Done(); handle(c) }()
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &Relay{Backend: network + ":" + back.Addr().String(), MaxPerSource: 4096}
	if len(tap) > 0 {
		r.Tap = tap[0] // the Go copy instead of the pump
	}
	served := make(chan error, 1)
	go func() { served <- r.Serve(ctx, ln) }()
	var once sync.Once
	var serr error
	stop := func() error {
		once.Do(func() {
			cancel()
			select {
			case serr = <-served:
			case <-time.After(10 * time.Second):
				serr = context.DeadlineExceeded
				t.Error("Serve did not return within 10 s of its context's end")
			}
			back.Close()
		})
		return serr
	}
	t.Cleanup(func() { stop() })
	return ln.Addr().String(), stop
}

// rvEcho echoes with a buffer of its own (io.Copy between two TCP
// connections would splice through pooled pipes, which stay open until a
// GC and look like leaked descriptors).
func rvEcho(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// Many connections through the relay, ended every way a guest can
// (plain close, reset, half-close, nothing sent, mid-flood): descriptors
// and threads return to where they were. The load runs twice, the
// baseline taken after the first (Go's runtime keeps its threads).
func TestReviewPumpRelayNoLeaks(t *testing.T) {
	addr, stop := rvRelay(t, rvEcho)
	load := func() {
		var wg sync.WaitGroup
		sem := make(chan struct{}, 32)
		for i := 0; i < 600; i++ {
			wg.Add(1)
			sem <- struct{}{}
			go func(i int) {
				defer wg.Done()
				defer func() { <-sem }()
				c, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				tc := c.(*net.TCPConn)
				switch i % 5 {
				case 0:
					tc.Close()
				case 1:
					tc.Write([]byte("hello"))
					io.ReadFull(tc, make([]byte, 5))
					tc.SetLinger(0)
					tc.Close()
				case 2:
					tc.Write([]byte("hello"))
					tc.CloseWrite()
					tc.SetReadDeadline(time.Now().Add(2 * time.Second))
					io.Copy(io.Discard, tc)
					tc.Close()
				case 3:
					buf := make([]byte, 256<<10)
					tc.SetWriteDeadline(time.Now().Add(20 * time.Millisecond))
					for {
						if _, err := tc.Write(buf); err != nil {
							break
						}
					}
					tc.SetLinger(0)
					tc.Close()
				case 4:
					tc.Write(make([]byte, 100<<10))
					tc.Close()
				}
			}(i)
		}
		wg.Wait()
	}
	settle := func(fd0, th0 int) (int, int) {
		deadline := time.Now().Add(8 * time.Second)
		var fd1, th1 int
		for time.Now().Before(deadline) {
			fd1, th1 = rvFDs(t), testenv.ThreadsNamed(os.Getpid(), "cvtpm-pump")
			if fd1 <= fd0 && th1 <= th0 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		return fd1, th1
	}
	load()
	time.Sleep(500 * time.Millisecond)
	fd0, th0 := rvFDs(t), testenv.ThreadsNamed(os.Getpid(), "cvtpm-pump")
	load()
	fd1, th1 := settle(fd0, th0)
	t.Logf("after a first load: fds %d, pump threads %d; after a second: fds %d, pump threads %d", fd0, th0, fd1, th1)
	if fd1 > fd0 || th1 > th0 {
		ents, _ := os.ReadDir("/proc/self/fd")
		for _, e := range ents {
			l, _ := os.Readlink("/proc/self/fd/" + e.Name())
			t.Logf("fd %s -> %s", e.Name(), l)
		}
	}
	if fd1 > fd0 {
		t.Errorf("%d descriptors more than before after every connection ended", fd1-fd0)
	}
	if th1 > th0 {
		t.Errorf("%d pump threads more than before after every connection ended", th1-th0)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// A guest floods a backend that never reads (and the reverse); once both
// are held back, the relay uses no CPU, and the process holds no more
// than the pump's buffers; then the guest resets, and still no spin.
func TestReviewPumpRelayIdleWhenBlocked(t *testing.T) {
	for _, dir := range []string{"guest floods", "backend floods"} {
		t.Run(dir, func(t *testing.T) {
			hold := make(chan struct{})
			defer close(hold)
			flood := func(c net.Conn) {
				buf := make([]byte, 64<<10)
				c.SetWriteDeadline(time.Now().Add(time.Second))
				for {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}
			addr, stop := rvRelay(t, func(c net.Conn) {
				defer c.Close()
				if dir == "backend floods" {
					flood(c)
				}
				<-hold
			})
			const n = 16
			var conns []*net.TCPConn
			for i := 0; i < n; i++ {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c.(*net.TCPConn))
			}
			var wg sync.WaitGroup
			if dir == "guest floods" {
				for _, c := range conns {
					wg.Add(1)
					go func() { defer wg.Done(); flood(c) }()
				}
				wg.Wait()
			} else {
				time.Sleep(1500 * time.Millisecond)
			}
			measure := func(what string) {
				time.Sleep(200 * time.Millisecond)
				c0, w0 := rvCPU(), time.Now()
				time.Sleep(time.Second)
				used := rvCPU() - c0
				t.Logf("%s: process CPU %v over %v, RSS %d KiB", what, used, time.Since(w0).Round(time.Millisecond), rvStatus(t, "VmRSS"))
				if used > 150*time.Millisecond {
					t.Errorf("%s: the process used %v of CPU in 1 s with every connection held back", what, used)
				}
			}
			measure("held back")
			for _, c := range conns {
				c.SetLinger(0)
				c.Close()
			}
			measure("after the guests reset")
			if err := stop(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Both sides write 8 MiB while reading, with small socket buffers so
// that sends are partial and buffers full; every byte arrives in order,
// then each side half-closes.
func TestReviewPumpRelayBothWaysLarge(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network+" backend", func(t *testing.T) { rvBothWays(t, network) })
	}
}

func rvBothWays(t *testing.T, network string) {
	const size = 8 << 20
	mk := func() []byte { b := make([]byte, size); rand.Read(b); return b }
	toBackend, toGuest := mk(), mk()
	type got struct {
		sum [32]byte
		n   int
		err error
	}
	backGot := make(chan got, 1)
	exchange := func(c net.Conn, send []byte, into chan<- got) {
		tc := c.(interface {
			net.Conn
			SetReadBuffer(int) error
			SetWriteBuffer(int) error
		})
		tc.SetReadBuffer(32 << 10)
		tc.SetWriteBuffer(16 << 10)
		tc.SetDeadline(time.Now().Add(60 * time.Second))
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := 0; off < len(send); {
				k := min(len(send)-off, 1+off%7919)
				n, err := tc.Write(send[off : off+k])
				off += n
				if err != nil {
					return
				}
			}
			// no half-close: the relay ends the pair at the first EOF
		}()
		h := sha256.New()
		n, err := io.CopyN(h, tc, size)
		var g got
		copy(g.sum[:], h.Sum(nil))
		g.n, g.err = int(n), err
		wg.Wait()
		into <- g
	}
	addr, stop := rvRelayTo(t, network, func(c net.Conn) {
		defer c.Close()
		exchange(c, toGuest, backGot)
		io.Copy(io.Discard, c)
	})
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	guestGot := make(chan got, 1)
	exchange(c, toBackend, guestGot)
	g, b := <-guestGot, <-backGot
	c.Close()
	if g.err != nil || g.sum != sha256.Sum256(toGuest) {
		t.Errorf("guest received %d bytes, err %v, equal %v", g.n, g.err, g.sum == sha256.Sum256(toGuest))
	}
	if b.err != nil || b.sum != sha256.Sum256(toBackend) {
		t.Errorf("backend received %d bytes, err %v, equal %v", b.n, b.err, b.sum == sha256.Sum256(toBackend))
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// Shutdown while every direction is held back on a full buffer: Serve
// returns and both ends see their connection end.
func TestReviewPumpRelayShutdownWhileBlocked(t *testing.T) {
	backends := make(chan net.Conn, 64)
	addr, stop := rvRelay(t, func(c net.Conn) {
		backends <- c
		buf := make([]byte, 64<<10)
		c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
		for {
			if _, err := c.Write(buf); err != nil {
				break
			}
		}
	})
	var guests []net.Conn
	for i := 0; i < 8; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		guests = append(guests, c)
		go func() {
			buf := make([]byte, 64<<10)
			c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
			for {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(time.Second)
	t0 := time.Now()
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("Serve returned %v after cancel", time.Since(t0))
	check := func(who string, c net.Conn) {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.Copy(io.Discard, c)
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Errorf("%s: connection still open 10 s after Serve returned", who)
		}
	}
	for _, g := range guests {
		check("guest", g)
		g.Close()
	}
	for len(backends) > 0 {
		b := <-backends
		check("backend", b)
		b.Close()
	}
}

// A guest that half-closes after its request, as an HTTP/1.0 or
// one-shot client does, and waits for the reply: the relay ends the pair
// at that EOF, so the reply is lost. The Go copy (here with a Tap) does
// the same: not new with the pump, listed for the record.
func TestReviewPumpRelayHalfCloseThenReply(t *testing.T) {
	for _, path := range []string{"pump", "Go copy"} {
		t.Run(path, func(t *testing.T) {
			var tap []io.Writer
			if path == "Go copy" {
				tap = append(tap, io.Discard)
			}
			addr, _ := rvRelayTo(t, "tcp", func(c net.Conn) {
				defer c.Close()
				req, _ := io.ReadAll(c) // up to the guest's half-close
				c.Write(bytes.ToUpper(req))
			}, tap...)
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.Write([]byte("request"))
			c.(*net.TCPConn).CloseWrite()
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			if string(got) != "REQUEST" {
				t.Errorf("after a half-close the guest got %q, %v; want the reply", got, err)
			}
		})
	}
}
