package sockmap

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"net"
	"testing"
	"time"
)

func newJoiner(t *testing.T) *Joiner {
	t.Helper()
	j, err := New()
	if err != nil {
		t.Skipf("no sockmap here: %v", err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

// tcpPair is a connected client and its accepted server end.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// relayed is guest <-> (relayIn | relayOut) <-> backend, joined in the
// kernel; it returns the guest and backend ends and Join's result.
func relayed(t *testing.T, j *Joiner, early []byte) (guest, backend net.Conn, done chan error) {
	t.Helper()
	guest, relayIn := tcpPair(t)
	relayOut, backend := tcpPair(t)
	if len(early) > 0 {
		// The guest speaks before the relay has joined: its bytes wait
		// in relayIn's queue.
		guest.Write(early)
		time.Sleep(20 * time.Millisecond)
	}
	done = make(chan error, 1)
	go func() {
		err := j.Join(context.Background(), relayIn, relayOut)
		relayIn.Close()
		relayOut.Close()
		done <- err
	}()
	return guest, backend, done
}

func TestJoinForwardsBothWaysInOrder(t *testing.T) {
	j := newJoiner(t)
	early := []byte("client hello, sent before the join")
	guest, backend, done := relayed(t, j, early)
	got := make([]byte, len(early))
	backend.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(backend, got); err != nil || !bytes.Equal(got, early) {
		t.Fatalf("bytes sent before the join: %q, %v", got, err)
	}
	// A megabyte each way, in small and large writes: every byte, in order.
	big := make([]byte, 1<<20)
	rand.Read(big)
	for _, dir := range []struct {
		name     string
		from, to net.Conn
	}{{"guest to backend", guest, backend}, {"backend to guest", backend, guest}} {
		go func() {
			for b := big; len(b) > 0; {
				n := min(len(b), 1+len(b)%7000)
				dir.from.Write(b[:n])
				b = b[n:]
			}
		}()
		got := make([]byte, len(big))
		dir.to.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(dir.to, got); err != nil || !bytes.Equal(got, big) {
			t.Fatalf("%s: %v (equal %v)", dir.name, err, bytes.Equal(got, big))
		}
	}
	// What a side sends before it closes reaches the other side, then
	// its end; and Join returns.
	backend.Write([]byte("last words"))
	backend.Close()
	guest.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(guest); err != nil || string(b) != "last words" {
		t.Fatalf("guest after the backend's close: %q, %v", b, err)
	}
	guest.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Join did not return after both sides closed")
	}
}

func TestJoinEndsWhenOneSideResets(t *testing.T) {
	j := newJoiner(t)
	guest, backend, done := relayed(t, j, nil)
	guest.Write([]byte("x"))
	backend.Read(make([]byte, 1))
	backend.(*net.TCPConn).SetLinger(0)
	backend.Close() // RST
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Join did not return after a reset")
	}
	guest.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := guest.Read(make([]byte, 1)); err == nil {
		t.Fatal("the guest's connection outlived the backend's reset")
	}
}

func TestJoinRefusesWhatItCannotJoin(t *testing.T) {
	j := newJoiner(t)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	tcp, _ := tcpPair(t)
	if err := j.Join(context.Background(), a, tcp); err != ErrUnsupported {
		t.Fatalf("a pipe: %v, want ErrUnsupported", err)
	}
}
