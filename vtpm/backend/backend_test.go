package backend

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"golang.org/x/sys/unix"

	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
)

func newSupervisor(t *testing.T, dir string, master byte) *Supervisor {
	t.Helper()
	return newSupervisorLogging(t, dir, master, nil)
}

// newSupervisorLogging is newSupervisor with its log sent to log (nil:
// the default).
func newSupervisorLogging(t testing.TB, dir string, master byte, log *slog.Logger) *Supervisor {
	t.Helper()
	keys, err := NewMasterKey(bytesOf(master, 32))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Config{Dir: dir, Keys: keys, Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"}, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func bytesOf(b byte, n int) []byte {
	out := make([]byte, n)
	for i := range out {
		out[i] = b
	}
	return out
}

// tpmOf is a go-tpm transport to one instance through the supervisor.
func tpmOf(s *Supervisor, id string) *tpmrpc.Client { return s.TPM(id, tpmrpc.Roles["host"]) }

const nvIndex = tpm2.TPMHandle(0x01500017)

func defineNV(t *testing.T, tpm *tpmrpc.Client) tpm2.TPM2BName {
	t.Helper()
	pub := tpm2.TPMSNVPublic{NVIndex: nvIndex, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   8}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		t.Fatalf("NV_DefineSpace: %v", err)
	}
	rp, err := (tpm2.NVReadPublic{NVIndex: nvIndex}).Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	return rp.NVName
}

func writeNV(tpm *tpmrpc.Client, name tpm2.TPM2BName, v uint64) error {
	_, err := (tpm2.NVWrite{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: nvIndex, Name: name},
		Data: tpm2.TPM2BMaxNVBuffer{Buffer: binary.BigEndian.AppendUint64(nil, v)}}).Execute(tpm)
	return err
}

func readNV(tpm *tpmrpc.Client, name tpm2.TPM2BName) (uint64, error) {
	r, err := (tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: tpm2.NamedHandle{Handle: nvIndex, Name: name}, Size: 8}).Execute(tpm)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(r.Data.Buffer), nil
}

func startup(t *testing.T, tpm *tpmrpc.Client) {
	t.Helper()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
}

func TestInstanceLifecycle(t *testing.T) {
	dir := t.TempDir()
	s := newSupervisor(t, dir, 1)
	for _, id := range []string{"vm1", "vm2"} {
		if _, err := s.Create(context.Background(), id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("duplicate create: %v", err)
	}
	for _, bad := range []string{"", "../x", ".hidden", strings.Repeat("a", 65), "a/b"} {
		if _, err := s.Create(context.Background(), bad, CreateOptions{}); err == nil || !strings.Contains(err.Error(), "instance id") {
			t.Fatalf("Create(%q) = %v", bad, err)
		}
	}
	list := s.List()
	if len(list) != 2 || list[0].ID != "vm1" || list[1].ID != "vm2" || list[0].State != StateRunning || list[0].PID == list[1].PID {
		t.Fatalf("List = %+v", list)
	}
	// The instances are separate TPMs: an index defined in one is absent
	// from the other.
	vm1, vm2 := tpmOf(s, "vm1"), tpmOf(s, "vm2")
	startup(t, vm1)
	startup(t, vm2)
	name := defineNV(t, vm1)
	if err := writeNV(vm1, name, 42); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.NVReadPublic{NVIndex: nvIndex}).Execute(vm2); err == nil {
		t.Fatal("vm2 sees vm1's NV index")
	}
	// State is sealed: the written value is in no file in clear.
	filepath.WalkDir(filepath.Join(dir, "vm1"), func(p string, d fs.DirEntry, err error) error {
		if b, _ := os.ReadFile(p); d != nil && !d.IsDir() && strings.Contains(string(b), "TPM2") {
			t.Errorf("%s looks unsealed", p)
		}
		return nil
	})
	// A backend restart keeps NV; a backend with another master key cannot
	// open the state and says so.
	s.Close()
	wrong, err := New(context.Background(), Config{Dir: dir, Keys: mustKey(t, 2), Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range wrong.List() {
		if i.State != StateFailed || !strings.Contains(i.Error, "sealed with a different key") {
			t.Errorf("instance under another master key: %+v", i)
		}
	}
	wrong.Close()
	s = newSupervisor(t, dir, 1)
	defer s.Close()
	vm1 = tpmOf(s, "vm1")
	startup(t, vm1)
	if v, err := readNV(vm1, name); err != nil || v != 42 {
		t.Fatalf("after restart NV = %d, %v", v, err)
	}
	if err := s.Delete(context.Background(), "vm2"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vm2")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("vm2 state still there: %v", err)
	}
	resp, _ := s.Call(context.Background(), "vm2", tpmrpc.Roles["host"], tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpRunning}), nil)
	if r, _ := tpmrpc.ParseResponse(resp); !strings.Contains(r.Err, `no instance "vm2"`) {
		t.Fatalf("call to a deleted instance: %+v", r)
	}
}

func mustKey(t *testing.T, b byte) KeySource {
	k, err := NewMasterKey(bytesOf(b, 32))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// kill -9 of a worker during a loop of NV writes: the supervisor restarts
// it and every acknowledged write is there.
func TestKillWorkerDuringWrites(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 3)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	tpm := tpmOf(s, "vm1")
	startup(t, tpm)
	name := defineNV(t, tpm)

	var acked atomic.Uint64
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		var failures int
		for v := uint64(1); ; v++ {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			if err := writeNV(tpm, name, v); err != nil {
				failures++
				if failures > 200 {
					done <- err
					return
				}
				time.Sleep(5 * time.Millisecond)
				v-- // write the same value again
				continue
			}
			acked.Store(v)
			// Every acknowledged write reads back, also across restarts.
			if got, err := readNV(tpm, name); err == nil && got < v {
				done <- errors.New("NV went backwards after an acknowledged write")
				return
			}
		}
	}()
	kills := 0
	for range 8 {
		time.Sleep(time.Duration(50+rand.IntN(150)) * time.Millisecond)
		info, err := s.Info("vm1")
		if err != nil || info.PID == 0 {
			continue
		}
		syscall.Kill(info.PID, syscall.SIGKILL)
		kills++
	}
	// Writes go on after the last kill (the worker came back): wait for
	// one more acknowledged write rather than count writes in a time,
	// which a loaded machine would make fail.
	afterKills := acked.Load()
	for deadline := time.Now().Add(30 * time.Second); acked.Load() <= afterKills+1 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	last := acked.Load()
	got, err := readNV(tpm, name)
	if err != nil {
		t.Fatal(err)
	}
	// The final value is the last acknowledged write, or one attempted
	// after it whose answer the kill swallowed.
	if got != last && got != last+1 {
		t.Fatalf("NV holds %d; last acknowledged write was %d", got, last)
	}
	info, _ := s.Info("vm1")
	if info.Restarts < kills/2 || last <= afterKills+1 {
		t.Fatalf("restarts %d after %d kills, %d writes acknowledged (%d when the kills ended)", info.Restarts, kills, last, afterKills)
	}
	t.Logf("%d kills, %d restarts, %d writes acknowledged, NV=%d", kills, info.Restarts, last, got)
}

func TestMasterKeySources(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k")
	os.WriteFile(path, []byte(strings.Repeat("ab", 32)+"\n"), 0o600)
	fromFile, err := MasterKeyFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	r, w, _ := os.Pipe()
	w.Write([]byte(strings.Repeat("ab", 32)))
	w.Close()
	// MasterKeyFromFD owns (and closes) the descriptor it is given: hand
	// it a duplicate, or r's finalizer would later close whatever file
	// reused the number (seen as EBADF in other tests).
	fd, err := unix.Dup(int(r.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	r.Close()
	fromFD, err := MasterKeyFromFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := fromFile.InstanceKey(context.Background(), "vm1")
	b, _ := fromFD.InstanceKey(context.Background(), "vm1")
	c, _ := fromFD.InstanceKey(context.Background(), "vm2")
	if string(a) != string(b) || string(a) == string(c) || len(a) != 32 {
		t.Fatal("instance keys: same master must give the same key per instance and differ between instances")
	}
	for _, bad := range []string{"zz", strings.Repeat("ab", 8)} {
		os.WriteFile(path, []byte(bad), 0o600)
		if _, err := MasterKeyFromFile(path); err == nil || strings.Contains(err.Error(), bad) {
			t.Fatalf("bad key %q: %v (the error must not echo the key)", bad, err)
		}
	}
	if s := fmt.Sprint(fromFile); strings.Contains(s, "abab") {
		t.Fatalf("the key prints: %s", s)
	}
}
