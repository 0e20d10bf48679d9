package verifier

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc/peer"

	attestpb "cvtpm/api/attest"
)

// Review 15, finding 3: every Attest call, however bogus and from whatever
// unauthenticated client, writes an "attestation appraised" info line;
// nothing rate-limits it per source (the CA's refusal lines are), so one
// client grows the verifier's log at its request rate, without bound.
func TestReview15AttestLogNotRateLimited(t *testing.T) {
	v, _ := newTestVerifier(t, nil)
	var buf bytes.Buffer
	s := &Server{Verifier: v, Log: slog.New(slog.NewTextHandler(&buf, nil))}
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.ParseIP("203.0.113.9"), Port: 1}})
	const calls = 500
	for range calls {
		if _, err := s.Attest(ctx, &attestpb.AttestRequest{Nonce: []byte("bogus"), Evidence: &attestpb.Evidence{InstanceId: "x"}}); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(buf.String(), "\n"); n > 50 {
		t.Fatalf("%d bogus Attest calls from one source wrote %d log lines (%d bytes): not rate-limited", calls, n, buf.Len())
	}
}
