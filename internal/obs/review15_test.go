package obs

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"cvtpm/internal/serve"
)

// Review 15, finding 6: the backend's and frontend's --metrics endpoint
// (obs.Serve) is a bare net.Listen + http.Server: no netaddr.Limits, no
// per-source or total connection cap (every other listener has one). One
// client holds as many descriptors as it opens (each kept for IdleTimeout,
// a minute, after one request), up to the daemon's RLIMIT_NOFILE, after
// which the backend's link accept, worker pipes and state files fail for
// every VM.
func TestReview15MetricsEndpointUncapped(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := Serve(ctx, "127.0.0.1:0", nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	const n = 4 * serve.DefaultMaxPerSource
	served := 0
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
		if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil && resp.StatusCode == 200 {
			served++
		}
	}
	if served > serve.DefaultMaxPerSource {
		t.Fatalf("one source holds %d concurrent connections to the metrics endpoint (other listeners cap a source at %d): no connection cap",
			served, serve.DefaultMaxPerSource)
	}
}
