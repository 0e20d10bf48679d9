package backend

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cvtpm/test/testenv"
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
	keys, err := NewMasterKey(bytesOf(1, 32))
	if err != nil {
		t.Fatal(err)
	}
	owned, moved := b.owned(t, id)
	s, err := New(context.Background(), Config{Dir: dir, Keys: keys, Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"},
		MigrationKey: bytesOf(9, 32), Anchors: owned, Moved: moved, Anchorer: a, AnchorInterval: 20 * time.Millisecond,
		ClaimTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// Review 2, finding 2: the backend keeps serving (and acknowledging the
// guest's writes) however long it cannot anchor. A host that cuts the
// backend's connection to the key broker, lets the guest work, then puts
// back an old copy of the instance directory and restarts the backend,
// rolls the instance back over everything written since the cut - not
// "about a second" (README, "What the host can still do").
func TestReview2BlockedAnchorsUnboundedRollback(t *testing.T) {
	dir := t.TempDir()
	broker := newFakeBroker(t)
	link := &cuttable{Anchorer: broker.view("a")}
	s := newSupervisorWithAnchorer(t, dir, broker, link, "a")
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vm1 := tpmOf(s, "vm1")
	startup(t, vm1)
	name := defineNV(t, vm1)
	if err := writeNV(vm1, name, 1); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // anchored
	// The host copies the directory (it is its disk), then cuts the
	// backend off the broker.
	old := t.TempDir()
	copyDir(t, filepath.Join(dir, "vm1"), old)
	link.cut.Store(true)
	for v := uint64(2); v <= 50; v++ { // the guest works on, for as long as the host likes
		if err := writeNV(vm1, name, v); err != nil {
			t.Fatalf("write %d while the broker is unreachable: %v", v, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	s.Close() // the final anchor fails too
	t.Logf("anchor attempts the host dropped: %d", link.tries.Load())
	os.RemoveAll(filepath.Join(dir, "vm1"))
	copyDir(t, old, filepath.Join(dir, "vm1"))
	link.cut.Store(false)
	s = newSupervisorWithAnchorer(t, dir, broker, link, "a")
	info, _ := s.Info("vm1")
	if info.State == StateFailed && strings.Contains(info.Error, "rolled back") {
		return
	}
	vm1 = tpmOf(s, "vm1")
	startup(t, vm1)
	v, err := readNV(vm1, name)
	t.Logf("after restart from the old copy: %+v, NV = %d, %v", info, v, err)
	if err == nil && v < 50 {
		t.Errorf("ROLLBACK undetected: the instance runs with NV = %d; the guest had written 50 (49 writes over %d dropped anchor rounds)", v, link.tries.Load())
	}
}

// Review 2, finding 3: a backend id is whatever the backend (i.e. the
// host's command line) names; the broker gives its master key and anchors
// to any approved CVM asking for it, and accepts both copies' reports.
// The host starts a second approved backend CVM with --backend-id a on a
// copy of a's disk: two live copies of vm1, both anchoring as owner "a".
// The guest writes on one; the other keeps serving the old state, and
// never learns it is behind the anchor (a rollback the host can show the
// guest whenever it likes, e.g. after a VM reset or a "migration").
func TestReview2SameBackendIDForks(t *testing.T) {
	broker := newFakeBroker(t)
	dir1, dir2 := t.TempDir(), t.TempDir()
	s1 := newBrokeredSupervisor(t, dir1, 1, broker, "a")
	if _, err := s1.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vm1 := tpmOf(s1, "vm1")
	startup(t, vm1)
	name := defineNV(t, vm1)
	if err := writeNV(vm1, name, 1); err != nil {
		t.Fatal(err)
	}
	s1.Close()
	copyDir(t, filepath.Join(dir1, "vm1"), filepath.Join(dir2, "vm1"))
	// Both CVMs run the approved image, both ask the broker for backend
	// "a" (same master key, same anchors).
	s1 = newBrokeredSupervisor(t, dir1, 1, broker, "a")
	s2 := newBrokeredSupervisor(t, dir2, 1, broker, "a")
	a, b := tpmOf(s1, "vm1"), tpmOf(s2, "vm1")
	startup(t, a)
	startup(t, b)
	for v := uint64(2); v <= 10; v++ {
		if err := writeNV(a, name, v); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond) // both copies anchor, many rounds
	owned, _ := broker.owned(t, "a")
	info, _ := s2.Info("vm1")
	v, err := readNV(b, name)
	t.Logf("anchor %d; second copy: %+v, NV = %d, %v", owned["vm1"], info, v, err)
	if err == nil && v != 10 {
		t.Errorf("FORK: a second live copy of vm1 (backend id a on another CVM) serves NV = %d after the guest wrote 10 on the first; "+
			"the broker released a's keys to it and accepted its lower generations", v)
	}
}
