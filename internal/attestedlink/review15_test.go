package attestedlink

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuf is a goroutine-safe log sink.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) lines() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Count(s.b.String(), "\n")
}

// newLoggedFixture is newFixture with a server logger set before Serve.
func newLoggedFixture(t testing.TB, log *slog.Logger) *fixture {
	t.Helper()
	return newFixtureLogged(t, 0x7, log)
}

// Review 15, finding 1: the link's only pre-authentication cap is the
// global one (4096, no per-source share). One unauthenticated source that
// opens 4096 TCP connections and never sends a ClientHello holds every slot
// for the 30 s handshake timeout (and simply reconnects), so every
// legitimate frontend is refused: denial of service not bounded to the
// attacker's share.
func TestReview15LinkUnauthenticatedFloodStarvesOthers(t *testing.T) {
	f := newFixture(t, 0x7)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 4096 {
		c, err := d.Dial("tcp", f.addr)
		if err != nil {
			t.Fatalf("attacker dial %d: %v", len(held), err)
		}
		held = append(held, c)
	}
	time.Sleep(time.Second) // let the server accept them all
	// A legitimate frontend from another address.
	s, err := f.dial(t, f.addr, f.policy)
	if err != nil {
		t.Fatalf("a legitimate client (127.0.0.1) was refused while one unauthenticated source (127.0.0.2, %d idle connections) held the link: %v", len(held), err)
	}
	s.Close()
}

// Review 15, finding 4: an authenticated client (e.g. the hostile host's
// frontend certificate) that opens and closes sessions in a loop writes
// "attested link session open"/"closed" (and "instance authorised") lines
// without any rate limit: the backend log grows without bound.
func TestReview15LinkSessionLogUnbounded(t *testing.T) {
	var buf syncBuf
	f := newLoggedFixture(t, slog.New(slog.NewTextHandler(&buf, nil)))
	const sessions = 200
	for range sessions {
		s, err := f.dial(t, f.addr, f.policy)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Call(context.Background(), "vm1", []byte("x")); err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	time.Sleep(200 * time.Millisecond)
	if n := buf.lines(); n > 50 {
		t.Fatalf("%d sessions from one client wrote %d log lines (not rate-limited; grows with the client's loop)", sessions, n)
	}
}
