package frontend

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// One source gets at most MaxPerSource relayed connections at a time; the
// rest are closed at once, and a slot frees when a connection ends.
func TestRelayCapsConnectionsPerSource(t *testing.T) {
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
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
