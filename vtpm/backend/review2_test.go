package backend

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// cuttable is the network between a backend and the key broker: the host
// may cut it (denial of service) whenever it likes.
type cuttable struct {
	Anchorer
	cut   atomic.Bool
	tries atomic.Int32
}

func (c *cuttable) Anchor(ctx context.Context, gens map[string]uint64) (map[string]string, error) {
	if c.cut.Load() {
		c.tries.Add(1)
		return nil, errors.New("connection reset by peer")
	}
	return c.Anchorer.Anchor(ctx, gens)
}

func (c *cuttable) Claim(ctx context.Context, inst string, gen uint64) error {
	if c.cut.Load() {
		return errors.New("connection reset by peer")
	}
	return c.Anchorer.Claim(ctx, inst, gen)
}

func newSupervisorWithAnchorer(t *testing.T, dir string, b *fakeBroker, a Anchorer, id string) *Supervisor {
	t.Helper()
	return newBrokeredSupervisorVia(t, dir, 1, b, a, id)
}

// Review 2, finding 2 (fixed: fail closed after MaxUnanchored): the backend kept serving (and acknowledging the
// guest's writes) however long it cannot anchor. A host that cuts the
// backend's connection to the key broker, lets the guest work, then puts
// back an old copy of the instance directory and restarts the backend,
// rolls the instance back over everything written since the cut - not
// "about a second" (README, "What the host can still do").
func TestBlockedAnchorsBoundRollback(t *testing.T) {
	dir := t.TempDir()
	broker := newFakeBroker(t)
	link := &cuttable{Anchorer: broker.view(t, "a")}
	s := newSupervisorWithAnchorer(t, dir, broker, link, "a")
	vm1, name := instanceWithNV(t, s, "vm1", 1)
	time.Sleep(100 * time.Millisecond) // anchored
	// The host copies the directory (it is its disk), then cuts the
	// backend off the broker.
	old := t.TempDir()
	copyDir(t, filepath.Join(dir, "vm1"), old)
	link.cut.Store(true)
	cutAt := time.Now()
	var lastOK time.Duration
	for v := uint64(2); v <= 1000; v++ { // the guest works on
		if err := writeNV(vm1, name, v); err != nil {
			if !strings.Contains(err.Error(), "has not recorded this backend's state") {
				t.Fatalf("write %d while the broker is unreachable: %v", v, err)
			}
			break
		}
		lastOK = time.Since(cutAt)
		time.Sleep(5 * time.Millisecond)
	}
	// Fail closed: writes stop being acknowledged once nothing was
	// recorded for MaxUnanchored (300 ms here, 10 s by default); that is
	// all a host that cuts the broker off and puts back an old copy of the
	// directory can roll back.
	if lastOK > 600*time.Millisecond {
		t.Errorf("writes were acknowledged %s after the broker was cut off (bound: 300 ms + one report interval)", lastOK)
	}
	t.Logf("last write acknowledged %s after the cut; %d reports dropped", lastOK, link.tries.Load())
	link.cut.Store(false)
	time.Sleep(100 * time.Millisecond)
	if err := writeNV(vm1, name, 7); err != nil {
		t.Errorf("writes after the broker is reachable again: %v", err)
	}
}

// Review 2, finding 3 (fixed: one session per backend id; the superseded one fails closed): a backend id is whatever the backend (i.e. the
// host's command line) names; the broker gives its master key and anchors
// to any approved CVM asking for it, and accepts both copies' reports.
// The host starts a second approved backend CVM with --backend-id a on a
// copy of a's disk: two live copies of vm1, both anchoring as owner "a".
// The guest writes on one; the other keeps serving the old state, and
// never learns it is behind the anchor (a rollback the host can show the
// guest whenever it likes, e.g. after a VM reset or a "migration").
func TestSameBackendIDDoesNotFork(t *testing.T) {
	broker := newFakeBroker(t)
	dir1, dir2 := t.TempDir(), t.TempDir()
	s1 := newBrokeredSupervisor(t, dir1, 1, broker, "a")
	_, name := instanceWithNV(t, s1, "vm1", 1)
	s1.Close()
	copyDir(t, filepath.Join(dir1, "vm1"), filepath.Join(dir2, "vm1"))
	// Both CVMs run the approved image, both ask the broker for backend
	// "a" (same master key, same anchors); the second release supersedes
	// the first session.
	s1 = newBrokeredSupervisor(t, dir1, 1, broker, "a")
	s2 := newBrokeredSupervisor(t, dir2, 1, broker, "a")
	a, b := tpmOf(s1, "vm1"), tpmOf(s2, "vm1")
	time.Sleep(500 * time.Millisecond) // s1's reports are refused: superseded
	if err := writeNV(a, name, 2); err == nil || !strings.Contains(err.Error(), "another CVM runs as this backend") {
		t.Errorf("FORK: the superseded copy of backend a still serves vm1: %v", err)
	}
	startup(t, b)
	if err := writeNV(b, name, 3); err != nil {
		t.Errorf("the current copy: %v", err)
	}
}
