package swtpmproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Probes of the C accept loop that held (they pass); kept as evidence.

func getRandomN(n int) []byte {
	return []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, byte(n)}
}

// checkGetRandom checks that a holds the answer to GetRandom(n), raw or
// prefixed.
func checkGetRandom(a []byte, n int, prefixed bool) bool {
	if prefixed {
		if len(a) != 4+12+n+4 || binary.BigEndian.Uint32(a) != uint32(12+n) {
			return false
		}
		a = a[4 : 4+12+n]
	}
	return len(a) == 12+n && binary.BigEndian.Uint32(a[2:]) == uint32(12+n) && rcOf(a) == 0 &&
		binary.BigEndian.Uint16(a[10:]) == uint16(n)
}

// serveEngine serves a started engine's data channel on network.
func serveEngine(t *testing.T, network string, paths Options) (srv *Server, addr string, cancel context.CancelFunc, done chan error) {
	return serveEngineOn(t, startedEngine(t), network, paths)
}

func serveEngineOn(t *testing.T, tpm TPM, network string, paths Options) (srv *Server, addr string, cancel context.CancelFunc, done chan error) {
	return serveOn(t, tpm, network, false, paths)
}

// P-1: many clients of every kind at once against the C loop (the sound
// tests run on echoTPM, i.e. the Go path only), with SIGUSR1 delivered
// throughout: every answer is its own, nothing leaks, the stop is prompt.
func TestAcceptProbeEngineStress(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			before := openFDs(t)
			srv, addr, cancel, done := serveEngine(t, network, Options{})
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGUSR1)
			defer signal.Stop(sigs)
			stopSig := make(chan struct{})
			var sigWG sync.WaitGroup
			sigWG.Add(1)
			go func() {
				defer sigWG.Done()
				for {
					select {
					case <-stopSig:
						return
					default:
					}
					syscall.Kill(syscall.Getpid(), syscall.SIGUSR1)
					time.Sleep(50 * time.Microsecond)
				}
			}()
			var wg sync.WaitGroup
			var bad atomic.Int32
			for id := range 16 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(id), 7))
					for range 30 {
						c, err := net.Dial(network, addr)
						if err != nil {
							t.Error(err)
							return
						}
						c.SetDeadline(time.Now().Add(20 * time.Second))
						prefixed := r.IntN(2) == 0
						var ns []int
						var msg []byte
						for range 1 + r.IntN(3) {
							n := 1 + r.IntN(32)
							ns = append(ns, n)
							cmd := getRandomN(n)
							if prefixed {
								cmd = prefixedCmd(0, cmd)
							}
							msg = append(msg, cmd...)
						}
						mode := r.IntN(7)
						switch mode {
						case 0: // one per connection
							ns = ns[:1]
							msg = msg[:len(msg)/len(ns)*1]
							if prefixed {
								msg = prefixedCmd(0, getRandomN(ns[0]))
							} else {
								msg = getRandomN(ns[0])
							}
							c.Write(msg)
						case 1: // pipelined
							c.Write(msg)
						case 2: // trickled
							for len(msg) > 0 {
								k := min(len(msg), 1+r.IntN(5))
								c.Write(msg[:k])
								msg = msg[k:]
								time.Sleep(time.Duration(r.IntN(1500)) * time.Microsecond)
							}
						case 3: // closes mid-command, RST on TCP
							if tc, ok := c.(*net.TCPConn); ok {
								tc.SetLinger(0)
							}
							c.Write(msg[:r.IntN(len(msg))])
							c.Close()
							continue
						case 4: // silent, then its commands
							time.Sleep(time.Duration(r.IntN(6)) * time.Millisecond)
							c.Write(msg)
						case 5: // garbage
							c.Write([]byte{0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
							io.ReadAll(c)
							c.Close()
							continue
						case 6: // sends, RST right after (never reads)
							if tc, ok := c.(*net.TCPConn); ok {
								tc.SetLinger(0)
							}
							c.Write(msg)
							c.Close()
							continue
						}
						for _, n := range ns {
							size := 12 + n
							if prefixed {
								size += 8
							}
							a := make([]byte, size)
							if _, err := io.ReadFull(c, a); err != nil || !checkGetRandom(a, n, prefixed) {
								bad.Add(1)
								t.Errorf("mode %d prefixed=%v n=%d: % x, %v", mode, prefixed, n, a, err)
								break
							}
						}
						c.Close()
					}
				}()
			}
			wg.Wait()
			close(stopSig)
			sigWG.Wait()
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("ServeData: %v", err)
				}
			case <-time.After(3 * time.Second):
				t.Fatal("ServeData did not return after cancel")
			}
			srv.Wait()
			time.Sleep(100 * time.Millisecond)
			if after := openFDs(t); after > before+1 {
				t.Errorf("%d descriptors before, %d after", before, after)
			}
		})
	}
}

// P-2: accept failing with EMFILE in the C loop pauses and recovers,
// and a stop during it still ends ServeData (within the pause's 1 s).
func TestAcceptProbeEMFILE(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		srv, addr, cancel, done := serveEngine(t, "unix", paths)
		rt := func() error {
			c, err := net.Dial("unix", addr)
			if err != nil {
				return err
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			c.Write(tpm2GetRandom8)
			_, err = io.ReadFull(c, make([]byte, 20))
			return err
		}
		before := atDescriptorLimit(t, addr, rt, 2*time.Second) // the pause grows to 1 s
		start := time.Now()
		cancel()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			t.Fatal("ServeData did not return after cancel")
		}
		srv.Wait()
		t.Logf("stop took %v", time.Since(start))
		time.Sleep(100 * time.Millisecond)
		if after := openFDs(t); after > before+1 {
			t.Errorf("%d descriptors before, %d after", before, after)
		}
	})
}

// P-3: Close, Accept, Control, ServeData and cancel raced on Listeners:
// no panic, no deadlock, ServeData ends, no write to a closed stopfd
// (run with -race).
func TestAcceptProbeListenerRaces(t *testing.T) {
	tpm := startedEngine(t)
	before := openFDs(t)
	for i := range 200 {
		path := filepath.Join(t.TempDir(), "l")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ul, err := Unpolled(ln, path)
		if err != nil {
			t.Fatal(err)
		}
		srv := New(tpm, Options{})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.ServeData(ctx, ul, false) }()
		var wg sync.WaitGroup
		wg.Add(4)
		go func() {
			defer wg.Done()
			if c, err := ul.Accept(); err == nil {
				c.Close()
			}
		}()
		go func() {
			defer wg.Done()
			raw, _ := ul.SyscallConn()
			for range 50 {
				raw.Control(func(uintptr) {})
			}
		}()
		go func() {
			defer wg.Done()
			if c, err := net.Dial("unix", path); err == nil {
				c.Write(tpm2GetRandom8)
				c.SetReadDeadline(time.Now().Add(time.Second))
				c.Read(make([]byte, 64))
				c.Close()
			}
		}()
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i%7) * 100 * time.Microsecond)
			if i%2 == 0 {
				cancel()
			} else {
				ul.Close()
			}
		}()
		select {
		case <-done:
		case <-time.After(3 * time.Second):
			t.Fatalf("round %d: ServeData still running", i)
		}
		cancel()
		ul.Close()
		wg.Wait()
		srv.Wait()
	}
	time.Sleep(100 * time.Millisecond)
	if after := openFDs(t); after > before+1 {
		t.Errorf("%d descriptors before, %d after", before, after)
	}
}

// P-4: a TCP client that advertises the smallest MSS and receive window
// and never reads cannot make the first answer's blocking send(2) block
// (one answer is at most the buffer size): the loop serves the next
// client and stops promptly.
func TestAcceptProbeNeverReadingTCPClient(t *testing.T) {
	srv, addr, cancel, done := serveEngine(t, "tcp", Options{})
	tcpAddr, _ := net.ResolveTCPAddr("tcp", addr)
	var fds []int
	for range 20 {
		fd, _ := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1)
		syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 88)
		if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: tcpAddr.Port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		// 200 pipelined GetRandom(64): the first is answered inline, the
		// rest are handed off and fill the window the client never opens.
		var msg []byte
		for range 200 {
			msg = append(msg, getRandomN(64)...)
		}
		syscall.Write(fd, msg)
		fds = append(fds, fd)
	}
	time.Sleep(200 * time.Millisecond)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if got := dataRoundTrip(t, c, tpm2GetRandom8); len(got) != 20 {
		t.Errorf("another client: % x", got)
	}
	c.Close()
	start := time.Now()
	cancel()
	waited := make(chan struct{})
	go func() { <-done; srv.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(3 * time.Second):
		t.Errorf("server did not stop with clients that never read")
	}
	t.Logf("stop took %v", time.Since(start))
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// P-5: commands of the largest size, raw and prefixed, alone and followed
// by a pipelined one, and a prefix claiming one byte more: the C loop and
// the Go path give the same bytes back.
func TestAcceptProbeLargeFrames(t *testing.T) {
	tpm := startedEngine(t)
	max := tpm.MaxCommandSize()
	run := func(paths Options) [][]byte {
		srv, addr, cancel, done := serveEngineOn(t, tpm, "unix", paths)
		defer func() { cancel(); <-done; srv.Wait() }()
		var out [][]byte
		for _, size := range []int{max - 1, max, max + 1} {
			for _, prefixed := range []bool{false, true} {
				for _, pipelined := range []bool{false, true} {
					cmd := make([]byte, size)
					copy(cmd, []byte{0x80, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x7b})
					binary.BigEndian.PutUint32(cmd[2:], uint32(size))
					msg := cmd
					if prefixed {
						msg = prefixedCmd(3, cmd)
					}
					if pipelined {
						msg = append(bytes.Clone(msg), tpm2GetRandom8...)
					}
					c, err := net.Dial("unix", addr)
					if err != nil {
						t.Fatal(err)
					}
					c.SetDeadline(time.Now().Add(3 * time.Second))
					c.Write(msg)
					c.(*net.UnixConn).CloseWrite()
					got, err := io.ReadAll(c)
					c.Close()
					if err != nil && !errors.Is(err, syscall.ECONNRESET) {
						t.Errorf("size %d: %v", size, err)
					}
					// GetRandom's bytes differ: keep the header.
					if pipelined && len(got) >= 20 {
						got = got[:len(got)-10]
					}
					out = append(out, got)
				}
			}
		}
		return out
	}
	c, g := run(Options{}), run(Options{NoStreamLoop: true})
	for i := range c {
		t.Logf("case %d: %d bytes % x", i, len(c[i]), c[i][:min(len(c[i]), 14)])
	}
	for i := range g {
		if !bytes.Equal(c[i], g[i]) {
			t.Errorf("case %d: C % x, Go % x", i, c[i], g[i])
		}
	}
}

// P-6: GOMAXPROCS=1, a separate process floods the data socket with
// connection-per-command clients (and silent ones): the control channel's
// round trips stay short on both paths.
func TestAcceptProbeGOMAXPROCS1ControlUnderFlood(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3")
	}
	forEachPath(t, func(t *testing.T, paths Options) {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
		_, ctrlPath, dataPath := cvtpmServerWith(t, paths)
		cc, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		roundTrip(t, cc, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
		d, _ := net.Dial("unix", dataPath)
		d.Write(tpm2StartupClr)
		readReply(t, d, false)
		d.Close()
		script := `
import socket, sys, time
p = sys.argv[1]; end = time.time() + 2; n = 0; held = []
cmd = bytes([0x80,1,0,0,0,12,0,0,1,0x7b,0,8])
while time.time() < end:
    s = socket.socket(socket.AF_UNIX); s.connect(p); s.send(cmd); s.recv(64); s.close(); n += 1
    if n % 50 == 0:
        h = socket.socket(socket.AF_UNIX); h.connect(p); held.append(h)
print(n)
`
		cmd := exec.Command(py, "-c", script, dataPath)
		var out bytes.Buffer
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		var worst time.Duration
		slow := 0
		for range 100 {
			start := time.Now()
			roundTrip(t, cc, ctrlMsg(CmdGetTPMEstablished), -1)
			took := time.Since(start)
			worst = max(worst, took)
			if took > 20*time.Millisecond {
				slow++
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Logf("%d of 100 control round trips over 20 ms", slow)
		cmd.Wait()
		t.Logf("flood of %s connections; slowest control round trip %v", bytes.TrimSpace(out.Bytes()), worst)
		if slow >= 5 {
			t.Errorf("%d control round trips over 20 ms (slowest %v)", slow, worst)
		}
	})
}

// P-7: disconnect mode (swtpm's --server disconnect) in the C loop: one
// command per connection, even pipelined, slow or trickled.
func TestAcceptProbeDisconnectMode(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		tpm := startedEngine(t)
		srv := New(tpm, paths)
		path := filepath.Join(t.TempDir(), "d")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- srv.ServeData(ctx, ln, true) }()
		defer func() { cancel(); <-done; srv.Wait() }()
		for _, mode := range []string{"pipelined", "slow", "trickled"} {
			c, _ := net.Dial("unix", path)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			two := append(bytes.Clone(tpm2GetRandom8), tpm2GetRandom8...)
			switch mode {
			case "pipelined":
				c.Write(two)
			case "slow":
				time.Sleep(30 * time.Millisecond)
				c.Write(two)
			case "trickled":
				for _, b := range two {
					c.Write([]byte{b})
					time.Sleep(500 * time.Microsecond)
				}
			}
			got, err := io.ReadAll(c)
			if err != nil || len(got) != 20 {
				t.Errorf("%s: got %d bytes, %v; want exactly one answer then EOF", mode, len(got), err)
			}
			c.Close()
		}
	})
}
