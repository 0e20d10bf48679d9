package backend

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	bolt "go.etcd.io/bbolt"

	"cvtpm/ca/keybroker"
	"cvtpm/test/testenv"
	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/engine/memstore"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/tpmrpc"
)

// call performs one request with caps and returns the response.
func call(t *testing.T, s *Supervisor, id string, caps tpmrpc.Capabilities, r tpmrpc.Request) tpmrpc.Response {
	t.Helper()
	out, err := s.Call(context.Background(), id, caps, tpmrpc.AppendRequest(nil, r), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := tpmrpc.ParseResponse(out)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func newMigratingSupervisor(t *testing.T, dir string, master, migration byte) *Supervisor {
	t.Helper()
	keys, err := NewMasterKey(bytesOf(master, 32))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Config{Dir: dir, Keys: keys, Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"},
		MigrationKey: bytesOf(migration, 32)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// Every operation is checked against the caller's capabilities.
func TestCapabilities(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host, guest := tpmrpc.Roles["host"], tpmrpc.Roles["guest"]
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	for _, tc := range []struct {
		name    string
		caps    tpmrpc.Capabilities
		req     tpmrpc.Request
		refused string // "" = allowed
	}{
		{"host command", host, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: getRandom}, ""},
		{"host command at locality 3", host, tpmrpc.Request{Op: tpmrpc.OpExecute, Locality: 3, Arg: tpmrpc.ExecuteAtLocality, Payload: getRandom}, ""},
		{"host command at locality 4", host, tpmrpc.Request{Op: tpmrpc.OpExecute, Locality: 4, Arg: tpmrpc.ExecuteAtLocality, Payload: getRandom}, `needs the "locality4" capability`},
		{"host set-locality 4", host, tpmrpc.Request{Op: tpmrpc.OpSetLocality, Locality: 4}, "locality4"},
		{"host hash-start", host, tpmrpc.Request{Op: tpmrpc.OpHashStart}, `hash-start needs the "hcrtm" capability`},
		{"host hash-data", host, tpmrpc.Request{Op: tpmrpc.OpHashData, Payload: []byte("x")}, "hcrtm"},
		{"host buffer-size query", host, tpmrpc.Request{Op: tpmrpc.OpSetBufferSize}, ""},
		{"guest command", guest, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: getRandom}, ""},
		{"guest init (resets PCRs)", guest, tpmrpc.Request{Op: tpmrpc.OpInit}, `init needs the "reset" capability`},
		{"guest stop", guest, tpmrpc.Request{Op: tpmrpc.OpStop}, "reset"},
		{"guest get-state", guest, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(engine.StatePermanent)}, `get-state needs the "migrate" capability`},
		{"guest set-buffer-size", guest, tpmrpc.Request{Op: tpmrpc.OpSetBufferSize, Arg: 4096}, "reset"},
		{"guest established query", guest, tpmrpc.Request{Op: tpmrpc.OpEstablished}, ""},
		{"nobody", 0, tpmrpc.Request{Op: tpmrpc.OpRunning}, "granted: none"},
	} {
		r := call(t, s, "vm1", tc.caps, tc.req)
		switch {
		case tc.refused == "" && r.Err != "":
			t.Errorf("%s: refused: %s", tc.name, r.Err)
		case tc.refused != "" && !strings.Contains(r.Err, tc.refused):
			t.Errorf("%s: got %+v, want a refusal saying %q", tc.name, r, tc.refused)
		}
	}
	// Even the host never gets plaintext state: without a migration key
	// state does not leave at all.
	r := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(engine.StatePermanent)})
	if r.Err == "" || !strings.Contains(r.Err, "no migration key") || len(r.Payload) != 0 {
		t.Errorf("get-state without a migration key: %+v", r)
	}
}

// An instance moves between two backends sharing a migration key (not
// their master keys), sealed in transit; whatever the host loads instead
// is refused and the instance keeps its state.
func TestMigrationBetweenBackends(t *testing.T) {
	ctx := context.Background()
	host := tpmrpc.Roles["host"]
	src := newMigratingSupervisor(t, t.TempDir(), 1, 9)
	dst := newMigratingSupervisor(t, t.TempDir(), 2, 9)
	other := newMigratingSupervisor(t, t.TempDir(), 3, 8) // another migration key
	for _, c := range []struct {
		s  *Supervisor
		id string
	}{{src, "vm1"}, {src, "vm2"}, {other, "vm1"}} {
		if _, err := c.s.Create(ctx, c.id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vm1 := tpmOf(src, "vm1")
	startup(t, vm1)
	name := defineNV(t, vm1)
	if err := writeNV(vm1, name, 7); err != nil {
		t.Fatal(err)
	}
	export := func(s *Supervisor, id string, st uint32) []byte {
		r := call(t, s, id, host, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(st)})
		if r.Err != "" || r.RC != 0 {
			t.Fatalf("get-state %d of %s: %+v", st, id, r)
		}
		return r.Payload
	}
	oldPerm := export(src, "vm1", engine.StatePermanent)
	if err := writeNV(vm1, name, 8); err != nil {
		t.Fatal(err)
	}
	perm, vol := export(src, "vm1", engine.StatePermanent), export(src, "vm1", engine.StateVolatile)
	// The export is an envelope under the migration key (9...9) for vm1,
	// and none of the permanent state it holds shows in it.
	mk, err := statestore.NewKey(bytesOf(9, 32), "")
	if err != nil {
		t.Fatal(err)
	}
	inner, _, err := mk.OpenTransfer("vm1", "permall", perm)
	if err != nil || len(inner) < 64 {
		t.Fatalf("exported permanent state is not vm1's envelope: %v", err)
	}
	for i := 0; i+32 <= len(inner); i += 32 {
		if bytes.Contains(perm, inner[i:i+32]) {
			t.Fatalf("exported state shows plaintext at %d", i)
		}
	}
	vm2Perm := export(src, "vm2", engine.StatePermanent)
	otherPerm := export(other, "vm1", engine.StatePermanent)

	if _, err := dst.Create(ctx, "vm1", CreateOptions{Incoming: true}); err != nil {
		t.Fatal(err)
	}
	load := func(st uint32, blob []byte) tpmrpc.Response {
		return call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpSetState, Arg: uint64(st), Payload: blob})
	}
	plain := plainPermanentState(t)
	for _, tc := range []struct {
		name, want string
		blob       []byte
	}{
		{"another instance's state", "sealed for another instance", vm2Perm},
		{"another backend's state (other migration key)", "sealed for another instance, or by a backend with another migration key", otherPerm},
		{"plaintext libtpms state", "not a state blob sealed by a cvtpm backend", plain},
		{"garbage", "not a state blob sealed by a cvtpm backend", []byte(strings.Repeat("\xa5", 1000))},
		// What the supervisor hands its worker after opening an envelope
		// (generation and blob in the clear) is never taken from a caller.
		{"the worker's own plain state message", "not a state blob sealed by a cvtpm backend", tpmrpc.AppendPlainState(nil, 1<<40, plain)},
	} {
		if r := load(engine.StatePermanent, tc.blob); !strings.Contains(r.Err, tc.want) {
			t.Errorf("%s: %+v, want %q", tc.name, r, tc.want)
		}
	}
	if r := load(engine.StatePermanent, perm); r.Err != "" || r.RC != 0 {
		t.Fatalf("loading the migrated permanent state: %+v", r)
	}
	if r := load(engine.StateVolatile, vol); r.Err != "" || r.RC != 0 {
		t.Fatalf("loading the migrated volatile state: %+v", r)
	}
	if r := call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit}); r.Err != "" || r.RC != 0 {
		t.Fatalf("init after migration: %+v", r)
	}
	// The volatile state resumes the started TPM.
	moved := tpmOf(dst, "vm1")
	if v, err := readNV(moved, name); err != nil || v != 8 {
		t.Fatalf("NV on the destination = %d, %v; want 8", v, err)
	}
	// A replay of the older export (NV = 7) is refused, and the state stays.
	call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpStop})
	if r := load(engine.StatePermanent, oldPerm); !strings.Contains(r.Err, "not newer than the instance's state") {
		t.Errorf("replayed older state: %+v", r)
	}
	call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit})
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(moved); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatal(err)
	}
	if v, err := readNV(moved, name); err != nil || v != 8 {
		t.Fatalf("NV after the refused replay = %d, %v; want 8", v, err)
	}
	// The source refuses its own older export too.
	call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpStop})
	if r := call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpSetState, Arg: uint64(engine.StatePermanent), Payload: oldPerm}); !strings.Contains(r.Err, "not newer") {
		t.Errorf("older export loaded back into the source: %+v", r)
	}
}

// instanceWithNV creates instance id on s, starts its TPM, defines the
// test NV index and writes v to it.
func instanceWithNV(t *testing.T, s *Supervisor, id string, v uint64) (*tpmrpc.Client, tpm2.TPM2BName) {
	t.Helper()
	if _, err := s.Create(context.Background(), id, CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tpm := tpmOf(s, id)
	startup(t, tpm)
	name := defineNV(t, tpm)
	if err := writeNV(tpm, name, v); err != nil {
		t.Fatal(err)
	}
	return tpm, name
}

// plainPermanentState is a genuine libtpms permanent state, as a host
// could make with its own swtpm.
func plainPermanentState(t *testing.T) []byte {
	t.Helper()
	e, err := engine.New(memstore.New(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if rc := e.Init(0); rc != 0 {
		t.Fatalf("Init: %#x", rc)
	}
	b, rc := e.GetState(engine.StatePermanent)
	if rc != 0 || len(b) == 0 {
		t.Fatalf("GetState: %#x", rc)
	}
	return b
}

// A tampered or planted state directory fails that instance only.
func TestTamperedInstanceDoesNotStopOthers(t *testing.T) {
	dir := t.TempDir()
	s := newSupervisor(t, dir, 1)
	for _, id := range []string{"vm1", "vm2", "vm3"} {
		if _, err := s.Create(context.Background(), id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	// vm1: manifest deleted. vm2: everything deleted, a plaintext swtpm
	// file planted.
	os.Remove(filepath.Join(dir, "vm1", "cvtpm.manifest"))
	files, _ := filepath.Glob(filepath.Join(dir, "vm2", "cvtpm.*"))
	for _, f := range files {
		os.Remove(f)
	}
	os.WriteFile(filepath.Join(dir, "vm2", "tpm2-00.permall"), []byte("\x02\x01\x00\x0a\x00\x00\x00\x00\x00\x10host state"), 0o600)
	s = newSupervisor(t, dir, 1)
	defer s.Close()
	want := map[string]string{"vm1": "cvtpm.manifest missing", "vm2": "refusing to import it implicitly", "vm3": ""}
	for _, i := range s.List() {
		switch w := want[i.ID]; {
		case w == "" && i.State != StateRunning:
			t.Errorf("%s: %+v, want running", i.ID, i)
		case w != "" && (i.State != StateFailed || !strings.Contains(i.Error, w)):
			t.Errorf("%s: %+v, want failed with %q", i.ID, i, w)
		}
	}
	r := call(t, s, "vm1", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpRunning})
	if !strings.Contains(r.Err, "cvtpm.manifest missing") {
		t.Errorf("call to the tampered instance: %+v", r)
	}
	// vm2 with every file gone: no new TPM silently in its place.
	for _, f := range []string{"tpm2-00.permall"} {
		os.Remove(filepath.Join(dir, "vm2", f))
	}
	r = call(t, s, "vm2", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpRunning})
	if !strings.Contains(r.Err, "sealed state is missing") {
		t.Errorf("call to the emptied instance: %+v", r)
	}
}

// fakeBroker is the key broker's anchor store (ca/keybroker, bbolt)
// without its network and attestation front (tested in ca/keybroker and
// test/).
type fakeBroker struct{ store *keybroker.BoltStore }

func newFakeBroker(t *testing.T) *fakeBroker {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "broker.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s, err := keybroker.NewBoltStore(db)
	if err != nil {
		t.Fatal(err)
	}
	return &fakeBroker{store: s}
}

const brokerScope = "domain/test"

// view is the broker as a newly released backend id sees it: a new
// session (the previous one's reports are refused from now on).
func (b *fakeBroker) view(t *testing.T, id string) *brokerView {
	lease := []byte(fmt.Sprintf("lease-%d", time.Now().UnixNano()))
	last, err := b.store.NewSession(context.Background(), id, lease)
	if err != nil {
		t.Fatal(err)
	}
	return &brokerView{b: b, id: id, lease: lease, counter: last}
}

// owned is what ReleaseKeys would return to backend id.
func (b *fakeBroker) owned(t *testing.T, id string) (map[string]uint64, map[string]string) {
	owned, moved, err := b.store.Anchors(context.Background(), brokerScope, id)
	if err != nil {
		t.Fatal(err)
	}
	return owned, moved
}

type brokerView struct {
	b       *fakeBroker
	id      string
	lease   []byte
	mu      sync.Mutex
	counter uint64
}

func (v *brokerView) Anchor(ctx context.Context, gens map[string]uint64) (map[string]string, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.counter++
	if err := v.b.store.Advance(ctx, v.id, v.lease, v.counter); err != nil {
		return nil, err
	}
	return v.b.store.RaiseAnchors(ctx, brokerScope, v.id, gens)
}

func (v *brokerView) Claim(ctx context.Context, inst string, gen uint64) error {
	for {
		st, err := v.b.store.Claim(ctx, brokerScope, v.id, inst, gen)
		if err != nil || st == keybroker.ClaimGranted {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("owner did not hand over: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// newBrokeredSupervisor is a backend whose keys and anchors come from a
// key broker: master key master, migration key 9, backend id id.
func newBrokeredSupervisor(t *testing.T, dir string, master byte, b *fakeBroker, id string) *Supervisor {
	t.Helper()
	return newBrokeredSupervisorVia(t, dir, master, b, b.view(t, id), id)
}

// newBrokeredSupervisorVia reaches the broker through a (which the host
// may cut).
func newBrokeredSupervisorVia(t *testing.T, dir string, master byte, b *fakeBroker, a Anchorer, id string) *Supervisor {
	t.Helper()
	keys, err := NewMasterKey(bytesOf(master, 32))
	if err != nil {
		t.Fatal(err)
	}
	owned, moved := b.owned(t, id)
	s, err := New(context.Background(), Config{Dir: dir, Keys: keys, Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"},
		MigrationKey: bytesOf(9, 32), Anchors: owned, Moved: moved, Anchorer: a, AnchorInterval: 20 * time.Millisecond,
		ClaimTimeout: 2 * time.Second, MaxUnanchored: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// An old complete copy of an instance's directory (manifest and blobs
// together, which the directory alone cannot detect) is refused against
// the anchored generation; the instance's id reused after a delete starts
// above its old anchor.
func TestWholeDirectoryRollback(t *testing.T) {
	dir := t.TempDir()
	broker := newFakeBroker(t)
	open := func() *Supervisor { return newBrokeredSupervisor(t, dir, 1, broker, "a") }
	s := open()
	for _, id := range []string{"vm1", "vm2"} {
		if _, err := s.Create(context.Background(), id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	vm1 := tpmOf(s, "vm1")
	startup(t, vm1)
	name := defineNV(t, vm1)
	writeNV(vm1, name, 1)
	s.Close()
	old := t.TempDir()
	copyDir(t, filepath.Join(dir, "vm1"), old)
	s = open()
	vm1 = tpmOf(s, "vm1")
	startup(t, vm1)
	for v := uint64(2); v < 5; v++ {
		writeNV(vm1, name, v)
	}
	s.Close() // anchors the last generations
	os.RemoveAll(filepath.Join(dir, "vm1"))
	copyDir(t, old, filepath.Join(dir, "vm1"))
	s = open()
	defer s.Close()
	info, _ := s.Info("vm1")
	if info.State != StateFailed || !strings.Contains(info.Error, "state rolled back") {
		t.Fatalf("vm1 from an old copy of its directory: %+v", info)
	}
	if info, _ := s.Info("vm2"); info.State != StateRunning {
		t.Fatalf("vm2: %+v", info)
	}
	// Delete and create vm2 again: the new instance is not refused.
	if err := s.Delete(context.Background(), "vm2"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(context.Background(), "vm2", CreateOptions{}); err != nil {
		t.Fatalf("re-creating vm2 above its old anchor: %v", err)
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	os.MkdirAll(to, 0o700)
	entries, _ := os.ReadDir(from)
	for _, e := range entries {
		if e.Name() == ".lock" {
			continue
		}
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(to, e.Name()), b, 0o600)
	}
}
