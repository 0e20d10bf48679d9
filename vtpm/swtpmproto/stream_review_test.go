package swtpmproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/engine"
)

// Tests from an adversarial review of the C stream loop (engine.ServeStream,
// cd5489a). Two reproduced findings, fixed since: a CMD_SET_DATAFD client
// that passed a datagram socket and never read its answers blocked the
// loop's send where shutdown(2) does not reach, so the server could not
// stop (the C loops now serve SOCK_STREAM sockets only); and a command
// already in hand when the connection's context ended was executed (the
// stop flag is now set before the loop starts). The others probe what held
// up: every ending, signals, control commands racing a stream, GOMAXPROCS=1.

// ctrlServer runs a Server on a started engine with only a control
// socket; the test stops it itself (cancel, CloseDataFD, Wait), so that a
// server that does not stop is reported rather than hanging the cleanup.
func ctrlServer(t *testing.T, opts Options) (srv *Server, ctrl *net.UnixConn, cancel context.CancelFunc) {
	t.Helper()
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rc := tpm.Init(0); rc != 0 {
		t.Fatalf("init: %#x", rc)
	}
	tpm.Execute(nil, tpm2StartupClr)
	path := filepath.Join(t.TempDir(), "ctrl")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv = New(tpm, opts)
	ctx, cancel := context.WithCancel(context.Background())
	go srv.ServeControl(ctx, ln)
	ctrl, err = net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctrl.Close(); cancel(); tpm.Close() })
	return srv, ctrl, cancel
}

// stopWithin stops srv as cvtpm socket does at the end (cancel,
// CloseDataFD, Wait) and reports whether Wait returned within d.
func stopWithin(srv *Server, cancel context.CancelFunc, d time.Duration) bool {
	cancel()
	srv.CloseDataFD()
	waited := make(chan struct{})
	go func() { srv.Wait(); close(waited) }()
	select {
	case <-waited:
		return true
	case <-time.After(d):
		return false
	}
}

// Finding: a control client passes, with CMD_SET_DATAFD, a connected
// AF_UNIX SOCK_DGRAM socket whose peer is not connected back (not a
// socketpair), sends commands and never reads the answers. Once the
// peer's queue holds net.unix.max_dgram_qlen answers, the stream loop's
// blocking send(2) sleeps on the peer's peer_wait queue, which
// shutdown(2) of the server's end does not wake: cancel + CloseDataFD +
// Wait never returns, so cvtpm socket cannot stop (it waits in srv.Wait
// before tpm.Stop). The Go path (MSG_DONTWAIT + netpoller) stops, and so
// does the stream loop on a SOCK_STREAM socketpair (QEMU's).
func TestStreamReviewDatagramDataFDBlocksStop(t *testing.T) {
	for _, tc := range []struct {
		name  string
		opts  Options
		dgram bool
	}{
		{"go path, datagram", Options{NoStreamLoop: true}, true},
		{"stream loop, stream socketpair", Options{}, false},
		{"stream loop, datagram", Options{}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, ctrl, cancel := ctrlServer(t, tc.opts)
			var a, b int
			var send func(b []byte, flags int) error
			if tc.dgram {
				tag := fmt.Sprintf("cvtpm-review-%d-%d", os.Getpid(), time.Now().UnixNano())
				addrA := &syscall.SockaddrUnix{Name: "@" + tag + "-a"}
				addrB := &syscall.SockaddrUnix{Name: "@" + tag + "-b"}
				var err error
				if a, err = syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0); err != nil {
					t.Fatal(err)
				}
				if b, err = syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0); err != nil {
					t.Fatal(err)
				}
				if err := syscall.Bind(a, addrA); err != nil {
					t.Fatal(err)
				}
				if err := syscall.Bind(b, addrB); err != nil {
					t.Fatal(err)
				}
				if err := syscall.Connect(b, addrA); err != nil { // a stays unconnected
					t.Fatal(err)
				}
				send = func(m []byte, flags int) error { return syscall.Sendto(a, m, flags, addrB) }
			} else {
				p, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
				if err != nil {
					t.Fatal(err)
				}
				a, b = p[0], p[1]
				send = func(m []byte, flags int) error { _, err := syscall.SendmsgN(a, m, nil, nil, flags); return err }
			}
			aClosed := false
			defer func() {
				if !aClosed {
					syscall.Close(a)
				}
			}()
			if r := roundTrip(t, ctrl, ctrlMsg(CmdSetDataFD), b); len(r) != 4 || binary.BigEndian.Uint32(r) != 0 {
				t.Fatalf("CMD_SET_DATAFD: % x", r)
			}
			syscall.Close(b)
			syscall.SetsockoptTimeval(a, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{Sec: 5})
			// One command answered and read: the connection is kept and
			// goes to the stream loop.
			if err := send(tpm2GetRandom8, 0); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 64)
			if n, err := syscall.Read(a, buf); err != nil || n != 20 {
				t.Fatalf("first answer: %d bytes, %v", n, err)
			}
			// Then commands whose answers are never read (until the
			// server's writes block).
			for range 40000 {
				if err := send(tpm2GetRandom8, syscall.MSG_DONTWAIT); err != nil {
					break
				}
			}
			time.Sleep(300 * time.Millisecond)
			streamed := srv.streamsServed.Load()
			stopped := stopWithin(srv, cancel, 3*time.Second)
			// Unblock whatever is left, so the test itself ends.
			syscall.Close(a)
			aClosed = true
			if !stopped {
				srv.Wait()
				t.Errorf("%s (streamed %d): the server did not stop within 3 s: its data connection's writer is blocked and shutdown does not wake it", tc.name, streamed)
			}
		})
	}
}

// Probe: with GOMAXPROCS=1, how long is a goroutine that sleeps 200 us
// held up while a kept data connection runs commands that write NVRAM
// (TPM2_Shutdown(STATE): the stream thread calls back into Go for
// every write) and the control channel is used.
func TestStreamReviewGOMAXPROCS1Gaps(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"go path", Options{NoStreamLoop: true}},
		{"stream loop", Options{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
			srv, c, dataPath := initedServer(t, tc.opts)
			d, err := net.Dial("unix", dataPath)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			stopProbe := gapProbe()
			shutdownState := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x45, 0, 1}
			var ctrlMax time.Duration
			for i := range 200 {
				d.Write(shutdownState)
				readReply(t, d, false)
				d.Write(tpm2GetRandom8)
				readReply(t, d, false)
				if i%10 == 0 {
					time.Sleep(2 * time.Millisecond)
					start := time.Now()
					roundTrip(t, c, ctrlMsg(CmdGetTPMEstablished), -1)
					ctrlMax = max(ctrlMax, time.Since(start))
				}
			}
			longest, long := stopProbe()
			t.Logf("%s: streamed %d; sleeper held up >5 ms %d times, longest %v; slowest control round trip %v",
				tc.name, srv.streamsServed.Load(), long, longest, ctrlMax)
			// The Go path's blocking reads hold the only P (fdio.go, a known
			// limit); the stream loop's thread holds none.
			if tc.opts.NoStreamLoop {
				return
			}
			if srv.streamsServed.Load() == 0 {
				t.Error("the stream loop served nothing")
			}
			if long >= 5 || ctrlMax > 20*time.Millisecond {
				t.Errorf("GOMAXPROCS=1 with a busy stream: a sleeping goroutine held up over 5 ms %d times (longest %v), slowest control round trip %v", long, longest, ctrlMax)
			}
		})
	}
}

// startedEngine is an initialized engine, closed when the test ends.
func startedEngine(t *testing.T) *engine.TPM {
	t.Helper()
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tpm.Close)
	if rc := tpm.Init(0); rc != 0 {
		t.Fatalf("init: %#x", rc)
	}
	tpm.Execute(nil, tpm2StartupClr)
	return tpm
}

// Finding: the Go path does not run a command once the connection's
// context has ended (handleData's loop condition and its "stopped while
// the command arrived" check). serveStream only sets the C loop's stop
// flag from a context.AfterFunc goroutine, so a complete command already
// in hand (pipelined bytes handOff or lazyConn.stream pass on) is executed
// and answered although ctx was cancelled before the hand-over.
func TestStreamReviewCancelledContextStillExecutes(t *testing.T) {
	tpm := startedEngine(t)
	srv := New(tpm, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	const tries = 20
	answered := map[string]int{}
	for range tries {
		for _, path := range []string{"go path", "stream loop"} {
			p := socketPair(t)
			fd, err := syscall.Dup(p[0])
			if err != nil {
				t.Fatal(err)
			}
			in := append(make([]byte, 0, 4096+prefixLen), tpm2GetRandom8...)
			if path == "go path" {
				bufs := srv.buffers.Get().(*connBuffers)
				srv.handleData(ctx, fdConn{fd: fd}, false, bufs, in)
				syscall.Close(fd)
			} else {
				conn := &ownedFD{fd: fd}
				if !srv.serveStream(ctx, conn, in, false, false) {
					t.Fatal("not streamed")
				}
				conn.close()
			}
			syscall.SetsockoptTimeval(p[1], syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{Usec: 100000})
			if n, _ := syscall.Read(p[1], make([]byte, 64)); n > 0 {
				answered[path]++
			}
		}
	}
	for path, n := range answered {
		if n > 0 {
			t.Errorf("%s: %d of %d commands executed and answered on a connection whose context had ended", path, n, tries)
		}
	}
}

// Probe (held): every way a streamed connection ends gives its slot and
// descriptor back: EOF, EOF within a command, bad bytes, a client that
// never reads and then closes, a locality-4 prefix and a prefix at 9.
func TestStreamReviewEndingsLeakNothing(t *testing.T) {
	srv, ctrlPath, dataPath := cvtpmServerWith(t, Options{RejectLocality4: true})
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	if d, err := net.Dial("unix", dataPath); err == nil {
		d.Write(tpm2StartupClr)
		readReply(t, d, false)
		d.Close()
	}
	getRandomOn(t, dataPath)
	time.Sleep(100 * time.Millisecond)
	fds, thr := openFDs(t), threads()
	for round := range 5 {
		for _, end := range []string{"eof", "truncated", "bad", "unread", "loc4", "loc9"} {
			d, err := net.Dial("unix", dataPath)
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				d.Write(tpm2GetRandom8)
				readReply(t, d, false)
			}
			switch end {
			case "truncated":
				d.Write(tpm2GetRandom8[:7])
				d.(*net.UnixConn).CloseWrite()
				d.Read(make([]byte, 1))
			case "bad":
				d.Write([]byte{0x80, 1, 0xff, 0xff, 0xff, 0xff})
				d.Read(make([]byte, 1))
			case "unread":
				d.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
				d.Write(bytes.Repeat(tpm2GetRandom8, 20000))
			case "loc4", "loc9":
				loc := byte(4)
				if end == "loc9" {
					loc = 9
				}
				d.Write(prefixedCmd(loc, tpm2GetRandom8))
				if r := readReply(t, d, true); binary.BigEndian.Uint32(r[10:]) != 0x107 {
					t.Errorf("%s: % x", end, r)
				}
			}
			d.Close()
		}
		_ = round
	}
	deadline := time.Now().Add(5 * time.Second)
	for (srv.streams.Load() != 0 || openFDs(t) > fds) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := srv.streams.Load(); n != 0 {
		t.Errorf("%d stream slots still taken", n)
	}
	if n := openFDs(t); n > fds {
		t.Errorf("%d descriptors open, %d before", n, fds)
	}
	t.Logf("streamed %d; threads %d -> %d", srv.streamsServed.Load(), thr, threads())
	// The locality stays what the last accepted prefix set (here 0).
	if r := roundTrip(t, c, ctrlMsg(CmdGetTPMEstablished), -1); len(r) != 8 {
		t.Errorf("control: % x", r)
	}
}

// Probe (held): signals delivered to the process while streams read,
// write (client slow to read) and run commands do not end or corrupt
// them (EINTR from poll, restarted read and send).
func TestStreamReviewSignals(t *testing.T) {
	srv, ctrlPath, dataPath := cvtpmServerWith(t, Options{})
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	stop := make(chan struct{})
	sent := make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				sent <- n
				return
			default:
			}
			syscall.Kill(os.Getpid(), syscall.SIGURG)
			syscall.Kill(os.Getpid(), syscall.SIGWINCH)
			n += 2
			time.Sleep(20 * time.Microsecond)
		}
	}()
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d, err := net.Dial("unix", dataPath)
			if err != nil {
				t.Error(err)
				return
			}
			defer d.Close()
			if i == 0 {
				d.Write(tpm2StartupClr)
				readReply(t, d, false)
			}
			for range 300 {
				// A batch big enough that the server's writes wait for
				// the client to read.
				d.Write(bytes.Repeat(tpm2GetRandom8, 64))
				for range 64 {
					r := readReply(t, d, false)
					if rcOf(r) != 0 && rcOf(r) != 0x100 {
						t.Errorf("GetRandom: % x", r)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	t.Logf("%d signals; streamed %d", <-sent, srv.streamsServed.Load())
}

// Probe (held): control commands racing a busy stream: after CMD_STOP is
// answered, a command gets TPM_RC_FAILURE until CMD_INIT; every answer
// on the busy stream stays a well-formed response of its own command.
func TestStreamReviewControlRace(t *testing.T) {
	_, ctrlPath, dataPath := cvtpmServerWith(t, Options{})
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	d, _ := net.Dial("unix", dataPath)
	defer d.Close()
	d.Write(tpm2StartupClr)
	readReply(t, d, false)
	done := make(chan struct{})
	var busyErr atomic.Value
	go func() {
		defer close(done)
		b, _ := net.Dial("unix", dataPath)
		defer b.Close()
		for i := range 3000 {
			loc := byte(i % 6)
			b.Write(prefixedCmd(loc, tpm2GetRandom8))
			r := readReply(t, b, true)
			size := binary.BigEndian.Uint32(r)
			rsp := r[4 : 4+size]
			ok := len(rsp) >= 10 && binary.BigEndian.Uint32(rsp[2:]) == size && binary.BigEndian.Uint32(r[4+size:]) == 0
			switch rc := binary.BigEndian.Uint32(rsp[6:]); {
			case !ok:
				busyErr.Store(fmt.Sprintf("malformed % x", r))
				return
			case loc > 4 && rc != 0x107:
				busyErr.Store(fmt.Sprintf("locality %d answered % x", loc, r))
				return
			case rc == 0 && size != 20:
				busyErr.Store(fmt.Sprintf("GetRandom(8) answered % x", r))
				return
			}
		}
	}()
	for i := 0; ; i++ {
		select {
		case <-done:
			if e := busyErr.Load(); e != nil {
				t.Error(e)
			}
			t.Logf("%d stop/init rounds", i)
			return
		default:
		}
		roundTrip(t, c, ctrlMsg(CmdSetLocality, byte(i%5)), -1)
		roundTrip(t, c, ctrlMsg(CmdStop), -1)
		d.Write(tpm2GetRandom8)
		if r := readReply(t, d, false); rcOf(r) != 0x101 {
			t.Fatalf("GetRandom after CMD_STOP: % x", r)
		}
		roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
		d.Write(tpm2StartupClr)
		readReply(t, d, false)
	}
}
