package swtpmproto

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/engine"
)

// stopWatchTPM is a TPM that records commands executed after stopped is set.
type stopWatchTPM struct {
	TPM
	stopped atomic.Bool
	late    atomic.Int32
}

func (s *stopWatchTPM) Execute(dst, cmd []byte) []byte {
	if s.stopped.Load() {
		s.late.Add(1)
	}
	return s.TPM.Execute(dst, cmd)
}

func (s *stopWatchTPM) ExecuteAt(dst, cmd []byte, loc uint8) []byte {
	if s.stopped.Load() {
		s.late.Add(1)
	}
	return s.TPM.ExecuteAt(dst, cmd, loc)
}

// The engine's C loops run commands without Execute: late counts none of
// theirs (the tests check the client's answers instead).
func (s *stopWatchTPM) ServeStream(fd int, pending []byte, maxCommand int, once, rejectLocality4 bool, stop *atomic.Int32) (uint64, error) {
	return s.TPM.(Streamer).ServeStream(fd, pending, maxCommand, once, rejectLocality4, stop)
}

func (s *stopWatchTPM) ServeListener(lfd, stopfd int, timeout time.Duration, tcp bool, maxCommand int, rejectLocality4, once bool, stop *atomic.Int32, buf []byte) (int, int, bool, uint64, error) {
	return s.TPM.(ListenerServer).ServeListener(lfd, stopfd, timeout, tcp, maxCommand, rejectLocality4, once, stop, buf)
}

// gapProbe starts a goroutine that sleeps 200 us at a time; stop ends it
// and returns the longest time between its wake-ups and how many exceeded
// 5 ms (a process frozen by a goroutine that holds the only P).
func gapProbe() (stop func() (longest time.Duration, over5ms int64)) {
	var maxGap, longGaps atomic.Int64
	quit := make(chan struct{})
	probed := make(chan struct{})
	go func() {
		defer close(probed)
		last := time.Now()
		for {
			select {
			case <-quit:
				return
			default:
			}
			time.Sleep(200 * time.Microsecond)
			now := time.Now()
			g := int64(now.Sub(last))
			if g > maxGap.Load() {
				maxGap.Store(g)
			}
			if g > int64(5*time.Millisecond) {
				longGaps.Add(1)
			}
			last = now
		}
	}()
	return func() (time.Duration, int64) {
		close(quit)
		<-probed
		return time.Duration(maxGap.Load()), longGaps.Load()
	}
}

// forEachPath runs f for the engine served by its C loops (ServeListener,
// ServeStream) and for it served command by command in Go.
func forEachPath(t *testing.T, f func(t *testing.T, paths Options)) {
	t.Run("C loops", func(t *testing.T) { f(t, Options{}) })
	t.Run("Go", func(t *testing.T) { f(t, Options{NoStreamLoop: true}) })
}

// Regression tests from an adversarial review of the inline data path
// (inline.go): each reproduced a finding against its first version.

// reviewServer serves the data channel of a started engine on a new
// listener of network ("unix" or "tcp").
func reviewServer(t *testing.T, network string, opts Options) (srv *Server, tpm *stopWatchTPM, ln net.Listener, cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	eng, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rc := eng.Init(0); rc != 0 {
		t.Fatalf("init: 0x%x", rc)
	}
	eng.Execute(nil, tpm2StartupClr)
	t.Cleanup(eng.Close) // runs last
	tpm = &stopWatchTPM{TPM: eng}
	srv, ln, cancel, done = reviewServe(t, tpm, network, opts)
	return srv, tpm, ln, cancel, done
}

// reviewServe serves the data channel of tpm on a new listener.
func reviewServe(t *testing.T, tpm TPM, network string, opts Options) (srv *Server, ln net.Listener, cancel context.CancelFunc, done <-chan error) {
	t.Helper()
	srv = New(tpm, opts)
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "data")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	served := make(chan struct{})
	go func() { errc <- srv.ServeData(ctx, ln, false); close(served) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-served:
		case <-time.After(5 * time.Second):
			t.Error("cleanup: ServeData did not return 5 s after cancel")
		}
		srv.Wait()
	})
	return srv, ln, cancel, errc
}

// Finding 1: the first version spent a receive timeout (8 ms, finding 5)
// on every silent connection before it accepted the next, so a local
// client that queued N silent connections delayed every other client by
// N x 8 ms. The inline phase now ends as soon as another connection waits.
func TestReviewSilentConnectionsStallListener(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		_, _, ln, _, _ := reviewServer(t, "unix", paths)
		path := ln.Addr().String()
		getRandomOn(t, path) // warm up
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for range 500 {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
		}
		start := time.Now()
		getRandomOn(t, path)
		// Stalled for inlineBudget on each, it would wait 500 x 2 ms = 1 s;
		// served, 0.1 s here (0.25 s under -race on a loaded machine).
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Errorf("a client queued behind 500 silent connections (no bytes sent) waited %v for GetRandom", d)
		}
	})
}

// Finding 2: a command whose last bytes arrived after the server's context
// ended was still executed and answered (the inline phase did not check
// ctx before answering; handleData had the same, narrower, race).
func TestReviewInlineCommandRunsAfterStop(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		_, tpm, _, _, _ := reviewServer(t, "unix", paths)
		const tries = 50
		answered := 0
		for range tries {
			srv, ln, cancel, done := reviewServe(t, tpm, "unix", paths)
			c, err := net.Dial("unix", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c.Write(tpm2GetRandom8[:len(tpm2GetRandom8)-1])
			time.Sleep(300 * time.Microsecond) // accepted, first bytes read, waiting for the rest
			tpm.stopped.Store(true)
			cancel()
			time.Sleep(time.Millisecond) // the server has had 1 ms to notice the stop
			c.Write(tpm2GetRandom8[len(tpm2GetRandom8)-1:])
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			buf := make([]byte, 64)
			n, _ := c.Read(buf)
			c.Close()
			<-done
			srv.Wait()
			if n > 0 {
				answered++
			}
			tpm.stopped.Store(false)
		}
		if late := tpm.late.Load(); late > 0 || answered > 0 {
			t.Errorf("%d of %d commands completed after cancel were executed, %d answered to the client", late, tries, answered)
		}
	})
}

// Finding 3: closing the listener did not end ServeData in the first
// version, and the duplicate descriptor kept a TCP port accepting and
// answering after ln.Close(). ServeData returns nil on a closed listener,
// as ServeControl does.
func TestReviewListenerCloseEndsServeData(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		_, _, ln, _, done := reviewServer(t, "tcp", paths)
		addr := ln.Addr().String()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		dataRoundTrip(t, c, tpm2GetRandom8)
		c.Close()
		ln.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("ServeData after ln.Close: %v", err)
			}
		case <-time.After(2 * time.Second):
			t.Errorf("ServeData still running 2 s after its listener was closed")
		}
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.SetReadDeadline(time.Now().Add(time.Second))
			c.Write(tpm2GetRandom8)
			n, rerr := c.Read(make([]byte, 64))
			c.Close()
			t.Errorf("closed listener's port still accepts connections (answer %d bytes, %v)", n, rerr)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Logf("dial after close: %v", err)
		}
	})
}

// Finding 4: with GOMAXPROCS=1 every silent connection froze the whole
// process (control channel, timers, every other goroutine) for two
// receive timeouts in the first version: the inline read and then the
// handed-off goroutine's first read blocked in RawSyscall holding the only
// P. The inline phase now waits in ppoll (a system call that gives up the
// P) and an idle handed-off connection starts in the netpoller.
func TestReviewGOMAXPROCS1SilentClientsFreezeProcess(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
		_, _, ln, _, _ := reviewServer(t, "unix", paths)
		path := ln.Addr().String()
		getRandomOn(t, path)
		// The fault froze the process once per silent connection (8-32 ms
		// each); a loaded machine can delay the sleeper a few milliseconds now
		// and then. So count the long gaps rather than take the longest.
		stopProbe := gapProbe()
		var held []net.Conn
		for range 20 {
			c, err := net.Dial("unix", path)
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, c)
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(100 * time.Millisecond)
		longest, n := stopProbe()
		for _, c := range held {
			c.Close()
		}
		if n >= 5 {
			t.Errorf("GOMAXPROCS=1: a goroutine sleeping 200 us was held up over 5 ms %d times (longest %v) while a client opened 20 silent data connections", n, longest)
		}
	})
}

// Finding 5 (cause of 1 and 4): SO_RCVTIMEO is kept in jiffies and rounded
// up, so a 2 ms receive timeout is ~8 ms on a HZ=250 kernel (20 ms on
// HZ=100). The inline phase waits with ppoll's high-resolution timeout
// instead: a silent connection ends it within about inlineBudget.
//
// The median of ten reads is checked, not the longest: a timeout rounded
// to jiffies makes every read long, while a busy machine (the whole suite
// running beside it on two CPUs) may deschedule any one of them for
// longer than the budget (12 ms seen once in CI).
func TestReviewReadWindow(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		conn, quietListener := socketPair(t), socketPair(t)
		var took []time.Duration
		for range 10 {
			start := time.Now()
			r := &inlineReader{fd: conn[0], lfd: quietListener[0], deadline: start.Add(inlineBudget)}
			n, err := r.Read(make([]byte, 16))
			took = append(took, time.Since(start))
			if n != 0 || !errors.Is(err, errHandOff) {
				t.Fatalf("silent read: %d, %v", n, err)
			}
		}
		slices.Sort(took)
		if median := took[len(took)/2]; median > 3*inlineBudget {
			t.Errorf("a read on a silent connection held the accepting goroutine for %v (median of 10; all: %v); inlineBudget is %v", median, took, inlineBudget)
		}
	})
}

// socketPair is a connected pair of unix stream sockets, closed when the
// test ends.
func socketPair(t *testing.T) [2]int {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fds[0]); syscall.Close(fds[1]) })
	return fds
}
