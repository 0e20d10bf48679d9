package frontend

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Review 15, finding 5: the relay logs "relaying a guest connection" (and,
// when the backend is down, "relay: backend unreachable") for every
// connection, without a rate limit: one guest that connects and hangs up
// in a loop — well within its 64-connection share — grows the frontend's
// log at its connection rate.
func TestReview15RelayLogPerConnection(t *testing.T) {
	echo := startBackend(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var buf lockedBuf
	r := &Relay{Backend: "tcp:" + echo.Addr().String(), Logger: slog.New(slog.NewTextHandler(&buf, nil))}
	go r.Serve(ctx, ln)
	const conns = 500
	for range conns {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		c.Close()
	}
	time.Sleep(300 * time.Millisecond)
	if n := strings.Count(buf.String(), "\n"); n > 50 {
		t.Fatalf("%d connect/hang-up cycles from one source wrote %d relay log lines: not rate-limited", conns, n)
	}
}
