package keybroker

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	capb "cvtpm/api/ca"
)

// hostRelay is the plaintext CA port as the host sees it: it records
// every Anchor request a backend sends and may drop it (denial of
// service, which the host may do) instead of forwarding it.
type hostRelay struct {
	direct
	drop     func(*capb.AnchorRequest) bool
	recorded []*capb.AnchorRequest
}

func (h *hostRelay) Anchor(ctx context.Context, in *capb.AnchorRequest, opts ...grpc.CallOption) (*capb.AnchorResponse, error) {
	h.recorded = append(h.recorded, in)
	if h.drop != nil && h.drop(in) {
		return nil, context.DeadlineExceeded // looks like a network failure to the backend
	}
	return h.direct.Anchor(ctx, in, opts...)
}

// Review 2, finding 1 (fixed: reports carry a session lease and a growing counter): an Anchor request carried no nonce, counter or
// time, so the host can replay an owner's old report. A claim of an old
// export then completes although the owner has moved past it: the host
// withholds the owner's newer reports and replays one at the exported
// generation. The destination takes the instance at the old state
// (rollback through migration) - exactly what ErrDenied is meant to stop.
func TestAnchorReplayDoesNotCompleteStaleClaim(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, boltStore(t), false)
	relay := &hostRelay{direct: direct{b: f.broker}}
	c := &Client{KB: relay, RootPublic: f.rootPub, Evidence: f.sim}
	a, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm")
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Release(ctx, "backend-b", "prod", "aes-256-gcm")
	if err != nil {
		t.Fatal(err)
	}
	// backend-a owns vm1 and reports generation 41 (e.g. its synchronous
	// anchor before an export, or one of its periodic reports). The host
	// records the request.
	ra := NewReporter(c, "backend-a", "prod", a)
	if _, err := ra.Anchor(ctx, map[string]uint64{"vm1": 41}); err != nil {
		t.Fatal(err)
	}
	captured := relay.recorded[len(relay.recorded)-1]
	// From now on the host drops backend-a's reports (denial of service).
	relay.drop = func(r *capb.AnchorRequest) bool { return r.GetBackendId() == "backend-a" }
	// The guest writes on backend-a: generation 42, 43, ... backend-a tries
	// to report them; the host drops them.
	for g := uint64(42); g <= 60; g++ {
		if _, err := ra.Anchor(ctx, map[string]uint64{"vm1": g}); err == nil {
			t.Fatal("relay did not drop")
		}
	}
	// The host feeds backend-b the export it kept at generation 41; b claims.
	done := make(chan error, 1)
	go func() {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		done <- NewReporter(c, "backend-b", "prod", b).Claim(cctx, "vm1", 41)
	}()
	time.Sleep(100 * time.Millisecond)
	// The host replays backend-a's old report straight to the broker: it
	// is refused (its counter is not above the last one).
	if _, err := f.broker.Anchor(ctx, captured); err == nil || !strings.Contains(err.Error(), "replayed report") {
		t.Errorf("replayed anchor request: %v", err)
	}
	err = <-done
	owned, _, _ := f.broker.Store.Anchors(ctx, "domain/prod", "backend-b")
	t.Logf("claim of generation 41 by backend-b: %v; backend-b now owns %v", err, owned)
	if err == nil {
		t.Errorf("ROLLBACK: backend-b took vm1 over at generation 41 although its owner backend-a had reached 60; " +
			"the host withheld a's reports and replayed its old Anchor request (no freshness in AnchorMAC)")
	} else if !strings.Contains(err.Error(), "newer state") && !strings.Contains(err.Error(), "did not hand") {
		t.Errorf("unexpected refusal: %v", err)
	}
}

// Review 2, finding 6 (fixed: a backend id is bound to its first domain): anchors and ownership live under the scope the
// request names (domain/D, or backend/ID without a domain), but the master
// key is the backend's whatever the domain. The host restarts backend-a's
// CVM with the same --backend-id and no --migration-domain (or another
// one): the broker releases the same master key - every instance's state
// opens - with an empty anchor set and nothing moved. The backend's
// rollback check (floor = released anchor) and its stale-copy check
// (Moved) see nothing: an old copy of its directory, or its stale copy of
// an instance that migrated away, runs again.
func TestDomainSwitchRefused(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, boltStore(t), false)
	c := f.client(f.sim)
	if _, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); err != nil {
		t.Fatal(err)
	}
	// The host restarts backend-a without its migration domain, or in
	// another: no keys (its anchors live in domain prod).
	for _, d := range []string{"", "elsewhere"} {
		if r, err := c.Release(ctx, "backend-a", d, "aes-256-gcm"); err == nil {
			t.Errorf("backend-a released in domain %q: anchors %v, moved %v (the rollback and stale-copy checks would see nothing)", d, r.Anchors, r.Moved)
		}
	}
}
