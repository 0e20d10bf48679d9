package swtpmproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// echoTPM answers every command with a success response carrying the
// command's bytes, so an answer that reaches the wrong connection shows.
type echoTPM struct{ TPM }

func (echoTPM) Execute(dst, cmd []byte) []byte {
	dst = append(dst, 0x80, 0x01)
	dst = binary.BigEndian.AppendUint32(dst, uint32(10+len(cmd)))
	dst = append(dst, 0, 0, 0, 0)
	return append(dst, cmd...)
}
func (e echoTPM) ExecuteAt(dst, cmd []byte, _ uint8) []byte { return e.Execute(dst, cmd) }
func (echoTPM) MaxCommandSize() int                         { return 4096 }

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func echoCmd(id, seq int, size int) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x7b}
	b = binary.BigEndian.AppendUint32(b, uint32(id))
	b = binary.BigEndian.AppendUint32(b, uint32(seq))
	for len(b) < size {
		b = append(b, byte(id^seq^len(b)))
	}
	binary.BigEndian.PutUint32(b[2:], uint32(len(b)))
	return b
}

func echoAnswer(cmd []byte) []byte {
	return echoTPM{}.Execute(nil, cmd)
}

func serveEcho(t *testing.T, network string, disconnect bool, opts Options) (srv *Server, addr string, cancel context.CancelFunc, done chan struct{}) {
	srv, addr, cancel, errc := serveOn(t, echoTPM{}, network, disconnect, opts)
	done = make(chan struct{})
	go func() {
		if err := <-errc; err != nil {
			t.Errorf("ServeData: %v", err)
		}
		close(done)
	}()
	return srv, addr, cancel, done
}

// serveOn serves tpm's data channel on a new listener of network ("unix"
// or "tcp"); done receives ServeData's result.
func serveOn(t *testing.T, tpm TPM, network string, disconnect bool, opts Options) (srv *Server, addr string, cancel context.CancelFunc, done chan error) {
	srv = New(tpm, opts)
	a := "127.0.0.1:0"
	if network == "unix" {
		a = filepath.Join(t.TempDir(), "d")
	}
	ln, err := net.Listen(network, a)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done = make(chan error, 1)
	go func() { done <- srv.ServeData(ctx, ln, disconnect) }()
	return srv, ln.Addr().String(), cancel, done
}

// Many clients with every behaviour at once: each answer must be its own,
// and no descriptor may be left once they are gone.
func TestSoundEchoStress(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			before := openFDs(t)
			srv, addr, cancel, done := serveEcho(t, network, false, Options{})
			var wg sync.WaitGroup
			for id := range 40 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(id), 1))
					for conn := range 25 {
						c, err := net.Dial(network, addr)
						if err != nil {
							t.Error(err)
							return
						}
						c.SetDeadline(time.Now().Add(20 * time.Second))
						key := id*1000 + conn
						mode := r.IntN(6)
						n := 1 + r.IntN(4)
						var cmds [][]byte
						for i := range n {
							cmds = append(cmds, echoCmd(key, i, 18+r.IntN(3000)))
						}
						switch mode {
						case 0: // one per connection
							cmds = cmds[:1]
							c.Write(cmds[0])
						case 1: // pipelined in one write
							c.Write(bytes.Join(cmds, nil))
						case 2: // trickled
							all := bytes.Join(cmds, nil)
							for len(all) > 0 {
								k := min(len(all), 1+r.IntN(400))
								c.Write(all[:k])
								all = all[k:]
								time.Sleep(time.Duration(r.IntN(300)) * time.Microsecond)
							}
						case 3: // close mid-command, with RST on TCP
							if tc, ok := c.(*net.TCPConn); ok {
								tc.SetLinger(0)
							}
							c.Write(cmds[0][:r.IntN(len(cmds[0]))])
							c.Close()
							continue
						case 4: // request/response with pauses
							for _, cmd := range cmds {
								c.Write(cmd)
								want := echoAnswer(cmd)
								got := make([]byte, len(want))
								if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
									t.Errorf("mode 4 key %d: %v, mismatch %v", key, err, !bytes.Equal(got, want))
								}
								time.Sleep(time.Duration(r.IntN(5)) * time.Millisecond)
							}
							c.Close()
							continue
						case 5: // garbage
							c.Write([]byte{0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
							io.ReadAll(c)
							c.Close()
							continue
						}
						want := bytes.Join(func() (a [][]byte) {
							for _, cmd := range cmds {
								a = append(a, echoAnswer(cmd))
							}
							return
						}(), nil)
						got := make([]byte, len(want))
						if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
							t.Errorf("mode %d key %d: %v, answers mismatch=%v", mode, key, err, !bytes.Equal(got, want))
						}
						c.Close()
					}
				}()
			}
			wg.Wait()
			stopAndCountFDs(t, srv, cancel, done, before)
		})
	}
}

// Accept failing with EMFILE pauses and recovers; nothing leaks.
// atDescriptorLimit checks rt, then keeps the process at its descriptor
// limit for hold with connections to addr (the server's accepts fail with
// EMFILE), lifts it, and waits until rt succeeds again. It returns the
// descriptors open before.
func atDescriptorLimit(t *testing.T, addr string, rt func() error, hold time.Duration) (before int) {
	t.Helper()
	if err := rt(); err != nil {
		t.Fatal(err)
	}
	before = openFDs(t)
	var old syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old)
	lim := old
	lim.Cur = uint64(before + 20)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skip(err)
	}
	var held []net.Conn
	for range 40 { // more than fit: the server side hits EMFILE
		c, err := net.Dial("unix", addr)
		if err != nil {
			break
		}
		held = append(held, c)
	}
	time.Sleep(hold)
	for _, c := range held {
		c.Close()
	}
	syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)
	t.Logf("held %d connections at the limit", len(held))
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := rt()
		if err == nil {
			return before
		}
		if time.Now().After(deadline) {
			t.Fatalf("not serving after EMFILE: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestSoundEMFILE(t *testing.T) {
	srv, addr, cancel, done := serveEcho(t, "unix", false, Options{})
	defer func() { cancel(); <-done; srv.Wait() }()
	cmd := echoCmd(1, 1, 20)
	rt := func() error {
		c, err := net.Dial("unix", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Write(cmd)
		got := make([]byte, len(echoAnswer(cmd)))
		_, err = io.ReadFull(c, got)
		return err
	}
	before := atDescriptorLimit(t, addr, rt, 300*time.Millisecond)
	time.Sleep(1500 * time.Millisecond) // the pause and the held connections drain
	if after := openFDs(t); after > before+1 {
		t.Errorf("%d descriptors before, %d after", before, after)
	}
}

// Disconnect mode: one command per connection, even pipelined or slow.
func TestSoundDisconnectMode(t *testing.T) {
	srv, addr, cancel, done := serveEcho(t, "unix", true, Options{})
	defer func() { cancel(); <-done; srv.Wait() }()
	for _, slow := range []bool{false, true} {
		c, _ := net.Dial("unix", addr)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		a, b := echoCmd(1, 1, 20), echoCmd(1, 2, 20)
		if slow {
			time.Sleep(30 * time.Millisecond)
		}
		c.Write(append(bytes.Clone(a), b...))
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, echoAnswer(a)) {
			t.Errorf("slow=%v: got %d bytes, %v; want exactly the first answer then EOF", slow, len(got), err)
		}
		c.Close()
	}
}

// --terminate: each path through the inline phase requests shutdown once
// the client goes; a stop does not.
func TestSoundTerminate(t *testing.T) {
	for i, client := range []func(c net.Conn){
		func(c net.Conn) {},
		func(c net.Conn) { c.Write(echoCmd(1, 1, 20)); io.ReadFull(c, make([]byte, 30)) },
		func(c net.Conn) {
			time.Sleep(30 * time.Millisecond)
			c.Write(echoCmd(1, 1, 20))
			io.ReadFull(c, make([]byte, 30))
		},
	} {
		srv, addr, cancel, done := serveEcho(t, "unix", false, Options{TerminateOnDisconnect: true})
		c, _ := net.Dial("unix", addr)
		client(c)
		select {
		case <-srv.ShutdownRequested():
			t.Errorf("case %d: shutdown requested before the client closed", i)
		case <-time.After(50 * time.Millisecond):
		}
		c.Close()
		select {
		case <-srv.ShutdownRequested():
		case <-time.After(2 * time.Second):
			t.Errorf("case %d: no shutdown after disconnect", i)
		}
		cancel()
		<-done
		srv.Wait()
	}
	fmt.Print()
}

// Stop while a handed-off connection is blocked writing (client never
// reads): ServeData and Wait return.
func TestSoundStopWhileWriteBlocked(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		srv, addr, cancel, done := serveEcho(t, network, false, Options{})
		c, _ := net.Dial(network, addr)
		cmd := echoCmd(1, 1, 4000)
		go func() {
			for range 2000 {
				if _, err := c.Write(cmd); err != nil {
					return
				}
			}
		}()
		time.Sleep(300 * time.Millisecond)
		cancel()
		waited := make(chan struct{})
		go func() { <-done; srv.Wait(); close(waited) }()
		select {
		case <-waited:
		case <-time.After(3 * time.Second):
			t.Errorf("%s: server did not stop with a connection blocked in write", network)
		}
		c.Close()
	}
}

// serverSideFD finds the descriptor of this process's end of the TCP
// connection whose peer is c's local address.
func serverSideFD(t *testing.T, c net.Conn) int {
	t.Helper()
	want := c.LocalAddr().(*net.TCPAddr)
	for fd := 3; fd < 4096; fd++ {
		sa, err := syscall.Getpeername(fd)
		if err != nil {
			continue
		}
		if in4, ok := sa.(*syscall.SockaddrInet4); ok && in4.Port == want.Port && net.IP(in4.Addr[:]).Equal(want.IP) {
			return fd
		}
	}
	t.Fatal("server side of the connection not found")
	return -1
}

// A handed-off TCP connection still gets keep-alive (through waitRead's
// net.FileConn, which sets it on the shared socket), as net's Accept did.
func TestSoundTCPKeepAlive(t *testing.T) {
	srv, _, ln, _, _ := reviewServer(t, "tcp", Options{})
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	dataRoundTrip(t, c, tpm2GetRandom8)
	time.Sleep(50 * time.Millisecond) // handed off
	fd := serverSideFD(t, c)
	idle, _ := syscall.GetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE)
	lnOn := -1
	if sc, ok := ln.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			rc.Control(func(l uintptr) { lnOn, _ = syscall.GetsockoptInt(int(l), syscall.SOL_SOCKET, syscall.SO_KEEPALIVE) })
		}
	}
	t.Logf("handOffs=%d", srv.handOffs.Load())
	t.Logf("server fd %d, listener SO_KEEPALIVE=%d, conn TCP_KEEPIDLE=%d", fd, lnOn, idle)
	if on, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_KEEPALIVE); err != nil || on == 0 {
		t.Errorf("server side of a kept TCP data connection: SO_KEEPALIVE=%d (%v), want on as net.Listener's Accept sets it", on, err)
	}
}

// stopAndCountFDs stops the server and checks that the process holds no
// more descriptors than before it started.
func stopAndCountFDs(t *testing.T, srv *Server, cancel context.CancelFunc, done chan struct{}, before int) {
	t.Helper()
	cancel()
	<-done
	srv.Wait()
	// Descriptors closed by other goroutines (and, under the race
	// detector, late) may take a moment.
	after := openFDs(t)
	for deadline := time.Now().Add(2 * time.Second); after > before && time.Now().Before(deadline); after = openFDs(t) {
		time.Sleep(20 * time.Millisecond)
	}
	if after > before {
		t.Errorf("%d descriptors before, %d after", before, after)
	}
}
