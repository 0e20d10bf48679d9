package swtpmproto

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Second adversarial review of the inline data path (at c1e636f): each
// test failed there and passes with the fix its comment names.

// R2-1: the listener-closed check runs only when the 500 ms accept deadline
// expires with no connection. A client that connects more often than every
// 500 ms keeps the deadline from ever expiring, so after ln.Close()
// ServeData never returns and the duplicate keeps the TCP port accepting
// and answering. Fixed: the check runs on a fixed schedule.
func TestReview2ClosedListenerKeptAliveByClient(t *testing.T) {
	_, _, ln, _, done := reviewServer(t, "tcp", Options{})
	addr := ln.Addr().String()
	stop, lnClosed := make(chan struct{}), make(chan struct{})
	var answered atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a client connecting every 100 ms
		defer wg.Done()
		closed := false
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				continue
			}
			c.SetDeadline(time.Now().Add(time.Second))
			c.Write(tpm2GetRandom8)
			if n, _ := c.Read(make([]byte, 64)); n > 0 && closed {
				answered.Add(1)
			}
			c.Close()
			if !closed {
				select {
				case <-lnClosed:
					closed = true
				default:
				}
			}
		}
	}()
	time.Sleep(300 * time.Millisecond)
	ln.Close()
	close(lnClosed)
	var err error
	returned := false
	select {
	case err = <-done:
		returned = true
	case <-time.After(3 * time.Second):
	}
	close(stop)
	wg.Wait()
	if !returned {
		t.Errorf("ServeData still running 3 s after ln.Close() while a client connects every 100 ms; %d commands answered on the closed listener's port", answered.Load())
	} else if err != nil {
		t.Errorf("ServeData: %v", err)
	}
}

// R2-2: inlineReader.wait checks the connection before the listener, so
// while a client keeps its own connection readable at each ppoll (a steady
// stream of bytes of a large command) the inline phase does not end when
// another connection waits: it holds the accepting goroutine for the whole
// inlineBudget although others queue. Fixed: a read after the first checks
// the listener, a waiting listener wins in ppoll, and every read checks
// the deadline.
func TestReview2TrickleIgnoresWaitingListener(t *testing.T) {
	conn, waiting := socketPair(t), socketPair(t)
	syscall.Write(waiting[1], []byte{1}) // "another connection waits": lfd is readable throughout
	// A command announcing 4096 bytes, its body trickled in 1-byte writes.
	hdr := []byte{0x80, 0x01, 0, 0, 0x10, 0, 0, 0, 0x01, 0x7b}
	syscall.Write(conn[1], hdr)
	stop := make(chan struct{})
	defer close(stop)
	for range 4 {
		go func() {
			b := []byte{0}
			for {
				select {
				case <-stop:
					return
				default:
				}
				syscall.Write(conn[1], b)
			}
		}()
	}
	// The median, not the worst: with the fault every try holds the whole
	// budget, while one try of a correct reader can lose a scheduler slice
	// on a loaded machine (1.07 ms seen under the full suite).
	var held []time.Duration
	for try := 0; try < 200 && len(held) < 11; try++ {
		start := time.Now()
		r := &inlineReader{fd: conn[0], lfd: waiting[0], deadline: start.Add(inlineBudget)}
		in := make([]byte, 0, 4105)
		_, err := readFrame(r, &in, 4096+prefixLen)
		d := time.Since(start)
		if err == errHandOff {
			held = append(held, d)
		}
		// drain and restart with a fresh header for the next try
		for {
			n, _ := recvNow(conn[0], make([]byte, 65536))
			if n <= 0 {
				break
			}
		}
		syscall.Write(conn[1], hdr)
	}
	if len(held) < 5 {
		// The writers finished the command inside the budget every time
		// (a fast moment): nothing to measure.
		t.Skipf("only %d of 200 tries ended in a hand-off", len(held))
	}
	slices.Sort(held)
	if med := held[len(held)/2]; med > inlineBudget/2 {
		t.Errorf("with another connection waiting on the listener, a trickling connection held the inline phase for %v (median of %d; inlineBudget %v)", med, len(held), inlineBudget)
	}
}

// A client that sends its command and half-closes (SHUT_WR) is answered, as
// by swtpm, both inline and when handed off.
func TestReview2HalfClose(t *testing.T) {
	_, _, ln, _, _ := reviewServer(t, "unix", Options{})
	path := ln.Addr().String()
	for _, delay := range []time.Duration{0, 10 * time.Millisecond} {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(delay)
		c.Write(tpm2GetRandom8)
		c.(*net.UnixConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || len(got) != 20 || rcOf(got) != 0 {
			t.Errorf("delay %v: half-closed client got % x, %v", delay, got, err)
		}
	}
}

// Commands of the engine's largest size (beyond the pool buffer when
// prefixed), inline and followed by a pipelined second one.
func TestReview2LargeCommands(t *testing.T) {
	srv, addr, cancel, done := serveEcho(t, "unix", false, Options{})
	defer func() { cancel(); <-done; srv.Wait() }()
	max := echoTPM{}.MaxCommandSize()
	for _, prefixed := range []bool{false, true} {
		for _, size := range []int{max - 1, max} {
			for _, pipelined := range []bool{false, true} {
				cmd := echoCmd(1, size, size)
				frame := func(cmd []byte) []byte {
					if !prefixed {
						return cmd
					}
					return append(binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8, 0}, uint32(len(cmd))), cmd...)
				}
				want := func(cmd []byte) []byte {
					a := echoAnswer(cmd)
					if !prefixed {
						return a
					}
					return append(append(binary.BigEndian.AppendUint32(nil, uint32(len(a))), a...), 0, 0, 0, 0)
				}
				msg, exp := frame(cmd), want(cmd)
				if pipelined {
					c2 := echoCmd(2, 2, 30)
					msg, exp = append(msg, frame(c2)...), append(exp, want(c2)...)
				}
				c, err := net.Dial("unix", addr)
				if err != nil {
					t.Fatal(err)
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				c.Write(msg)
				got := make([]byte, len(exp))
				_, err = io.ReadFull(c, got)
				c.Close()
				if err != nil || !bytes.Equal(got, exp) {
					t.Errorf("prefixed=%v size=%d pipelined=%v: %v, equal=%v", prefixed, size, pipelined, err, bytes.Equal(got, exp))
				}
			}
		}
	}
}

func threads() int {
	ents, _ := os.ReadDir("/proc/self/task")
	return len(ents)
}

// R2-3: each silent connection handed off costs the server two descriptors
// (the connection and waitRead's net.FileConn duplicate, held for as long
// as the client stays silent), where net.Listener's Accept cost one.
// Fixed: an idle connection is handed off as a net.Conn (one descriptor).
func TestReview2SilentConnectionDescriptors(t *testing.T) {
	_, _, ln, _, _ := reviewServer(t, "unix", Options{})
	path := ln.Addr().String()
	getRandomOn(t, path)
	time.Sleep(50 * time.Millisecond)
	const n = 200
	before := openFDs(t)
	var held []net.Conn
	for range n {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	time.Sleep(300 * time.Millisecond)
	server := openFDs(t) - before - n // minus the client ends
	for _, c := range held {
		c.Close()
	}
	if server > n+10 {
		t.Errorf("%d silent connections hold %d server-side descriptors", n, server)
	}
}

// R2-4 (pre-existing, reached at once on hand-off now): a handed-off
// connection writes with blocking write(2), so a client that pipelines
// commands and never reads pins one OS thread per connection; Go aborts
// the process at 10000 threads. Fixed: fdConn writes with MSG_DONTWAIT
// and waits for a full socket in the netpoller.
func TestReview2UnreadAnswersPinThreads(t *testing.T) {
	srv, addr, cancel, done := serveEcho(t, "unix", false, Options{})
	defer func() { cancel(); <-done; srv.Wait() }()
	before := threads()
	const n = 100
	cmd := bytes.Repeat(echoCmd(1, 1, 4000), 16)
	var held []net.Conn
	for range n {
		c, err := net.Dial("unix", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		go func() {
			for {
				if _, err := c.Write(cmd); err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(time.Second)
	after := threads()
	for _, c := range held {
		c.Close()
	}
	if after-before > 20 {
		t.Errorf("%d clients that never read their answers: %d threads before, %d after", n, before, after)
	}
}

// Signals delivered throughout (ppoll returns EINTR, never restarted), and
// clients that reset (TCP RST) after their answer, in the close-wait: every
// answer right, the listener serving, nothing leaked.
func TestReview2SoundSignalsAndReset(t *testing.T) {
	before := openFDs(t)
	srv, addr, cancel, done := serveEcho(t, "tcp", false, Options{})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1)
	defer signal.Stop(sigs)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			syscall.Kill(syscall.Getpid(), syscall.SIGUSR1)
			time.Sleep(20 * time.Microsecond)
		}
	}()
	for i := range 400 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		cmd := echoCmd(i, i, 20)
		if i%3 == 1 {
			time.Sleep(3 * time.Millisecond) // handed off, idle
		}
		c.Write(cmd)
		got := make([]byte, len(echoAnswer(cmd)))
		if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, echoAnswer(cmd)) {
			t.Fatalf("conn %d: %v", i, err)
		}
		if i%2 == 0 {
			c.(*net.TCPConn).SetLinger(0)
		}
		c.Close()
	}
	close(stop)
	wg.Wait()
	stopAndCountFDs(t, srv, cancel, done, before)
}
