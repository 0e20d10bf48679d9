package frontend

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// startBackend listens on loopback and runs serve on each connection
// (then closes it) until the test ends.
func startBackend(t *testing.T, serve func(net.Conn)) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { serve(c); c.Close() }()
		}
	}()
	return ln
}

// One source gets at most MaxPerSource relayed connections at a time; the
// rest are closed at once, and a slot frees when a connection ends.
func TestRelayCapsConnectionsPerSource(t *testing.T) {
	echo := startBackend(t, func(c net.Conn) { io.Copy(c, c) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r := &Relay{Backend: "tcp:" + echo.Addr().String(), MaxPerSource: 2}
	go r.Serve(ctx, ln)
	works := func(c net.Conn) bool {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return false
		}
		b := make([]byte, 4)
		_, err := io.ReadFull(c, b)
		return err == nil && string(b) == "ping"
	}
	dial := func() net.Conn {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	a, b := dial(), dial()
	if !works(a) || !works(b) {
		t.Fatal("the first two connections are not relayed")
	}
	third := dial()
	if works(third) {
		t.Fatal("a third connection from the same source was relayed")
	}
	third.Close()
	a.Close()
	time.Sleep(100 * time.Millisecond)
	fourth := dial()
	defer fourth.Close()
	if !works(fourth) {
		t.Fatal("a slot did not free when a connection ended")
	}
	b.Close()
}

// Stopping the relay ends the connections it copies (on their copy
// threads, internal/pump) and Serve returns only after they ended.
func TestRelayStopEndsRelayedConnections(t *testing.T) {
	echo := startBackend(t, func(c net.Conn) { io.Copy(c, c) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	r := &Relay{Backend: "tcp:" + echo.Addr().String()}
	go func() { served <- r.Serve(ctx, ln) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		t.Fatalf("not relayed: %v", err)
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after its context ended")
	}
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatalf("the relayed connection is still open after the relay stopped (read %d bytes)", n)
	}
}
