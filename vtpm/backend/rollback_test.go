package backend

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/tpmrpc"
)

// exportState is the host's get-state (sealed envelope).
func exportState(t *testing.T, s *Supervisor, id string, st uint32) []byte {
	t.Helper()
	r := call(t, s, id, tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(st)})
	if r.Err != "" || r.RC != 0 {
		t.Fatalf("get-state %d of %s: %+v", st, id, r)
	}
	return bytes.Clone(r.Payload)
}

// importState is the host's set-state.
func importState(t *testing.T, s *Supervisor, id string, st uint32, env []byte) tpmrpc.Response {
	t.Helper()
	return call(t, s, id, tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpSetState, Arg: uint64(st), Payload: env})
}

// Finding 1a: an envelope the host took at any earlier time is accepted by
// a fresh --incoming instance: the generation floor of an instance without
// state is 0, so the host rolls the instance back to any snapshot when it
// migrates it (here the NV counter goes from 8 back to 7).
func TestHostRollsBackThroughIncomingInstance(t *testing.T) {
	ctx := context.Background()
	broker := newFakeBroker(t)
	src := newBrokeredSupervisor(t, t.TempDir(), 1, broker, "a")
	dst := newBrokeredSupervisor(t, t.TempDir(), 2, broker, "b")
	vm1, name := instanceWithNV(t, src, "vm1", 7)
	// The host silently snapshots the running instance.
	oldPerm := exportState(t, src, "vm1", engine.StatePermanent)
	oldVol := exportState(t, src, "vm1", engine.StateVolatile)
	// The guest goes on: NV = 8 (e.g. a monotonic counter, a revoked secret).
	if err := writeNV(vm1, name, 8); err != nil {
		t.Fatal(err)
	}
	// A migration: QEMU stops the source; the host feeds the destination
	// the OLD snapshot instead of the current state.
	call(t, src, "vm1", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpStop})
	if _, err := dst.Create(ctx, "vm1", CreateOptions{Incoming: true}); err != nil {
		t.Fatal(err)
	}
	if r := importState(t, dst, "vm1", engine.StatePermanent, oldPerm); r.Err != "" || r.RC != 0 {
		if !strings.Contains(r.Err, "has newer state than the claimed export") && !strings.Contains(r.Err, "older than the instance's anchored") {
			t.Errorf("old permanent state refused for another reason: %+v", r)
		}
		return
	}
	if r := importState(t, dst, "vm1", engine.StateVolatile, oldVol); r.Err != "" || r.RC != 0 {
		t.Logf("old volatile state refused: %+v", r)
	}
	if r := call(t, dst, "vm1", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpInit}); r.Err != "" || r.RC != 0 {
		t.Fatalf("init: %+v", r)
	}
	moved := tpmOf(dst, "vm1")
	if v, err := readNV(moved, name); err == nil && v == 7 {
		t.Errorf("ROLLBACK: the migrated instance reads NV = %d (the host's old snapshot), the guest last wrote 8", v)
	}
}

// Finding 1b: the generation in an envelope is a per-backend counter that
// the host can raise at will on a stale copy (every get-state of the
// volatile blob saves and deletes it: +2). After a legitimate migration
// the source copy still exists; the host pumps its generation above the
// destination's and loads the source's stale state into the live,
// already-running destination instance: the "not newer" check passes.
func TestHostInflatesStaleCopyGeneration(t *testing.T) {
	ctx := context.Background()
	host := tpmrpc.Roles["host"]
	broker := newFakeBroker(t)
	src := newBrokeredSupervisor(t, t.TempDir(), 1, broker, "a")
	dst := newBrokeredSupervisor(t, t.TempDir(), 2, broker, "b")
	_, name := instanceWithNV(t, src, "vm1", 7)
	// Legitimate migration src -> dst.
	perm, vol := exportState(t, src, "vm1", engine.StatePermanent), exportState(t, src, "vm1", engine.StateVolatile)
	call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpStop})
	if _, err := dst.Create(ctx, "vm1", CreateOptions{Incoming: true}); err != nil {
		t.Fatal(err)
	}
	// In QEMU's order: libtpms checks volatile state against the permanent.
	for _, b := range []struct {
		st  uint32
		env []byte
	}{{engine.StatePermanent, perm}, {engine.StateVolatile, vol}} {
		if r := importState(t, dst, "vm1", b.st, b.env); r.Err != "" || r.RC != 0 {
			t.Fatalf("migration: %+v", r)
		}
	}
	call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit})
	moved := tpmOf(dst, "vm1")
	// The guest lives on at the destination: NV = 8, 9, ... 20.
	for v := uint64(8); v <= 20; v++ {
		if err := writeNV(moved, name, v); err != nil {
			t.Fatal(err)
		}
	}
	// The host restarts the stale source copy and tries to take state
	// from it: the key broker says vm1 lives on backend b now, so the
	// stale copy stops and gives nothing.
	call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit})
	r := call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(engine.StatePermanent)})
	if r.Err == "" || !strings.Contains(r.Err, "migrated to backend b") {
		t.Fatalf("export from the stale source copy: %+v", r)
	}
	if info, _ := src.Info("vm1"); info.State != StateFailed || !strings.Contains(info.Error, "stale") {
		t.Errorf("stale source copy: %+v", info)
	}
	// And the destination refuses a replay of the export it loaded.
	call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpStop})
	if r := importState(t, dst, "vm1", engine.StatePermanent, perm); r.Err == "" {
		t.Errorf("replayed export loaded into the live destination: %+v", r)
	}
	call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit})
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(moved); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Fatal(err)
	}
	if v, err := readNV(moved, name); err != nil || v != 20 {
		t.Errorf("destination NV = %d, %v; want 20", v, err)
	}
}

// Finding 2: locality is per-TPM state; an OpExecute without
// ExecuteAtLocality is checked as locality 0-3 (CapCommand) but runs at
// whatever locality the previous caller left. After a client granted
// locality4 used it, a client without it (the host) runs commands at
// locality 4: here it satisfies TPM2_PolicyLocality(4) and reads an NV
// secret that only locality 4 may read.
func TestLocality4DoesNotLeakToOtherCallers(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := tpmOf(s, "vm1") // tpmrpc.Roles["host"]: no locality4
	startup(t, host)
	// policy = SHA-256(0^32 || TPM_CC_PolicyLocality || TPMA_LOCALITY_4)
	pd := sha256.Sum256(append(make([]byte, 32), 0, 0, 1, 0x6f, 0x10))
	const idx tpm2.TPMHandle = 0x01500099
	pub := tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256, AuthPolicy: tpm2.TPM2BDigest{Buffer: pd[:]},
		Attributes: tpm2.TPMANV{OwnerWrite: true, PolicyRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary}, DataSize: 6}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(host); err != nil {
		t.Fatal(err)
	}
	rp, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(host)
	if err != nil {
		t.Fatal(err)
	}
	nv := tpm2.NamedHandle{Handle: idx, Name: rp.NVName}
	if _, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv, Data: tpm2.TPM2BMaxNVBuffer{Buffer: []byte("secret")}}).Execute(host); err != nil {
		t.Fatal(err)
	}
	readAtLocality4Policy := func() ([]byte, error) {
		sess, closeSess, err := tpm2.PolicySession(host, tpm2.TPMAlgSHA256, 16)
		if err != nil {
			return nil, err
		}
		defer closeSess()
		cmd := binary.BigEndian.AppendUint32([]byte{0x80, 0x01, 0, 0, 0, 15, 0, 0, 0x01, 0x6f}, uint32(sess.Handle()))
		if resp, err := host.Send(append(cmd, 0x10)); err != nil || responseCode(resp) != 0 {
			return nil, fmt.Errorf("PolicyLocality: %v %x", err, resp)
		}
		// TPM2_NV_Read(idx, idx) with the policy session (empty nonce and HMAC).
		nvRead := []byte{0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x4e}
		nvRead = binary.BigEndian.AppendUint32(nvRead, uint32(idx))
		nvRead = binary.BigEndian.AppendUint32(nvRead, uint32(idx))
		nvRead = binary.BigEndian.AppendUint32(nvRead, 9)
		nvRead = binary.BigEndian.AppendUint32(nvRead, uint32(sess.Handle()))
		nvRead = append(nvRead, 0, 0, 1, 0, 0) // nonce, continueSession, hmac
		nvRead = append(nvRead, 0, 6, 0, 0)    // size 6, offset 0
		binary.BigEndian.PutUint32(nvRead[2:], uint32(len(nvRead)))
		resp, err := host.Send(nvRead)
		if err != nil {
			return nil, err
		}
		if rc := responseCode(resp); rc != 0 {
			return nil, fmt.Errorf("NV_Read: TPM rc %#x", rc)
		}
		// header, parameterSize u32, TPM2B data
		return resp[16 : 16+6], nil
	}
	for loc := uint8(0); loc <= 3; loc++ {
		host.ExecuteAt(nil, []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 1}, loc) // GetRandom at loc
		b, err := readAtLocality4Policy()
		t.Logf("host read at locality %d: %q, %v", loc, b, err)
		if err == nil {
			t.Fatalf("the locality-4 secret %q was read at locality %d: the test's premise is wrong", b, loc)
		}
	}
	// A trusted agent with the locality4 grant uses it once.
	agent := s.TPM("vm1", tpmrpc.CapCommand|tpmrpc.CapLocality4)
	if rc := agent.SetLocality(4); rc != 0 {
		t.Fatalf("agent set-locality 4: %#x", rc)
	}
	// The host, which was never granted locality 4:
	b, err := readAtLocality4Policy()
	t.Logf("host read after the agent's set-locality 4: %q, %v", b, err)
	if err == nil {
		t.Errorf("the host (capabilities %v) read the locality-4-only NV secret %q", tpmrpc.Roles["host"], b)
	}
}

// Finding 3: state files are sealed with a key derived from the master key
// and the instance id only, and the manifest accepts a blob NEWER than it
// records ("a crash between the two renames"). An instance deleted and
// created again under the same id starts at generation 0, so the host
// puts the previous incarnation's cvtpm.permall (higher generation) into
// the new instance's directory; at the next init the new instance is the
// old TPM: its seeds, EK and NV contents.
func TestRecreatedInstanceDoesNotTakeOldIncarnationsState(t *testing.T) {
	ctx := context.Background()
	host := tpmrpc.Roles["host"]
	dir := t.TempDir()
	s := newSupervisor(t, dir, 1)
	defer s.Close()
	if _, err := s.Create(ctx, "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	old := tpmOf(s, "vm1")
	startup(t, old)
	name := defineNV(t, old)
	for v := uint64(1); v <= 20; v++ { // the old tenant's life: many saves
		if err := writeNV(old, name, 1000+v); err != nil {
			t.Fatal(err)
		}
	}
	permPath := filepath.Join(dir, "vm1", "cvtpm.permall")
	oldPerm, err := os.ReadFile(permPath) // the host copies the file off its disk
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "vm1"); err != nil {
		t.Fatal(err)
	}
	// A new VM (maybe a new tenant) gets the id vm1.
	if _, err := s.Create(ctx, "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	fresh := tpmOf(s, "vm1")
	startup(t, fresh)
	if _, err := readNV(fresh, name); err == nil {
		t.Fatal("the new instance already has the old NV index; premise wrong")
	}
	// The host plants the old file and resets the VM (init).
	if err := os.WriteFile(permPath, oldPerm, 0o600); err != nil {
		t.Fatal(err)
	}
	call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpStop})
	if r := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit}); r.Err != "" || r.RC != 0 {
		t.Logf("init refused the planted file (good): %+v", r)
		return
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(fresh); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		t.Logf("startup: %v", err)
	}
	if v, err := readNV(fresh, name); err == nil {
		t.Errorf("the re-created instance vm1 now holds the deleted incarnation's state (NV = %d)", v)
	}
}
