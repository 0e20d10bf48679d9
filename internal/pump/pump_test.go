package pump

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// pair returns the relay's two sides: the client's end of a connection
// whose server end is a, and the server's end of one whose client end is b.
func pair(t *testing.T) (client, a, b, server net.Conn) {
	t.Helper()
	conn := func() (net.Conn, net.Conn) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(); s.Close() })
		return c, s
	}
	client, a = conn()
	b, server = conn()
	return client, a, b, server
}

// start runs the pump until the test ends; the channel receives Run's
// error.
func start(t *testing.T, ctx context.Context, a, b net.Conn) <-chan error {
	ctx, cancel := context.WithCancel(ctx)
	done, result := make(chan struct{}), make(chan error, 1)
	go func() {
		err := Run(ctx, a.(*net.TCPConn), b.(*net.TCPConn))
		result <- err
		close(done)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return")
		}
	})
	return result
}

func TestRunCopiesBothWays(t *testing.T) {
	client, a, b, server := pair(t)
	start(t, context.Background(), a, b)
	for _, size := range []int{1, 10, 4096, 1 << 20} {
		msg := make([]byte, size)
		rand.Read(msg)
		go client.Write(msg)
		got := make([]byte, size)
		if _, err := io.ReadFull(server, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("%d bytes client->server: err %v, equal %v", size, err, bytes.Equal(got, msg))
		}
		go server.Write(msg)
		if _, err := io.ReadFull(client, got); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("%d bytes server->client: err %v", size, err)
		}
	}
	// The copy runs on a thread named for ps and top (and for the relay's
	// leak test, which counts these threads).
	if n := testenv.ThreadsNamed(os.Getpid(), "cvtpm-pump"); n != 1 {
		t.Errorf("%d threads named cvtpm-pump while one pair is copied, want 1", n)
	}
	client.Close()
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := server.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the client closed, the server read %d, %v; want EOF", n, err)
	}
}

// A side that does not read holds the other back: the pump reads no more
// than it can send on (TCP's backpressure through the relay).
func TestRunKeepsBackpressure(t *testing.T) {
	client, a, b, _ := pair(t)
	start(t, context.Background(), a, b)
	written := make(chan int, 1)
	go func() {
		total := 0
		buf := make([]byte, 64<<10)
		client.SetWriteDeadline(time.Now().Add(2 * time.Second))
		for {
			n, err := client.Write(buf)
			total += n
			if err != nil {
				written <- total
				return
			}
		}
	}()
	total := <-written
	// Socket buffers on both connections plus the pump's 64 KiB; the
	// kernel's autotuning bounds each buffer at a few MiB.
	if total > 64<<20 {
		t.Fatalf("a client wrote %d MiB to a server that did not read", total>>20)
	}
	t.Logf("held back after %d KiB", total>>10)
}

func TestRunEndsWithContext(t *testing.T) {
	client, a, b, server := pair(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := start(t, ctx, a, b)
	client.Write([]byte("x"))
	io.ReadFull(server, make([]byte, 1))
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not end with its context")
	}
	server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := server.Read(make([]byte, 1)); err == nil {
		t.Fatal("the server's connection stayed open after the relay stopped")
	}
}

// pipeConn is a connection with no descriptor (net.Pipe).
type pipeConn struct{ net.Conn }

func (pipeConn) SyscallConn() (syscall.RawConn, error) {
	return nil, errors.New("no descriptor")
}

func TestRunUnsupportedLeavesConnectionsOpen(t *testing.T) {
	client, a, b, server := pair(t)
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if err := Run(context.Background(), a.(*net.TCPConn), pipeConn{p1}); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Run with a pipe: %v, want ErrUnsupported", err)
	}
	// a is still usable.
	go client.Write([]byte("y"))
	if _, err := io.ReadFull(a, make([]byte, 1)); err != nil {
		t.Fatalf("a after ErrUnsupported: %v", err)
	}
	b.Close()
	server.Close()
}

// With no thread to be had (a service's task limit, say), Run leaves both
// connections open for the caller to copy in Go.
func TestRunWithoutThreadLeavesConnectionsOpen(t *testing.T) {
	client, a, b, server := pair(t)
	orig := startThread
	startThread = func(int, int, int, int) syscall.Errno { return syscall.EAGAIN }
	defer func() { startThread = orig }()
	if err := Run(context.Background(), a.(*net.TCPConn), b.(*net.TCPConn)); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("Run without a thread: %v, want ErrUnsupported", err)
	}
	for _, c := range []struct{ from, to net.Conn }{{client, a}, {server, b}} {
		go c.from.Write([]byte("z"))
		c.to.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c.to, make([]byte, 1)); err != nil {
			t.Fatalf("a connection after a failed thread start: %v", err)
		}
	}
}
