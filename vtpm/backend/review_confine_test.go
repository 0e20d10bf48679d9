package backend

// Review test (fixed): a worker taken over after its seccomp filter is
// installed stole the next instance's state key from the spare worker's
// key pipe, reopened through /proc/<spare>/fd/4. Workers now see no /proc,
// and are non-dumpable and without capabilities from their first
// instruction (internal/confine/early_linux.go), so the reopening fails.
//
// The workers here are this test binary (testworker_test.go: the real
// worker.Run and its filter) plus, in the worker serving vm1 only, an
// "attacker" goroutine that waits until the filter is
// on (Seccomp: 2) and then does what code execution gained through a
// libtpms bug could do with the allowed system calls.

import (
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/vtpm/tpmrpc"
)

func reviewConfined() bool {
	b, _ := os.ReadFile("/proc/self/status")
	return strings.Contains(string(b), "\nSeccomp:\t2\n")
}

// reviewServes says whether this worker holds instance id's directory open.
func reviewServes(id string) bool {
	for fd := range 64 {
		if l, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd)); err == nil && (filepath.Base(l) == id || strings.Contains(l, "/"+id+"/")) {
			return true
		}
	}
	return false
}

func reviewEvil(dir string) {
	report := func(name, s string) { os.WriteFile(filepath.Join(dir, name), []byte(s), 0o600) }
	if _, err := os.ReadFile("/proc/self/status"); err != nil {
		// A root worker sees an empty /proc (internal/confine): it
		// cannot find the spare, let alone its descriptors.
		report("error", err.Error())
		return
	}
	for !reviewConfined() {
		time.Sleep(5 * time.Millisecond)
	}
	if !reviewServes("vm1") {
		return
	}
	// Find the spare: a process of this user whose command line has
	// --spare (openat, getdents64, read: all allowed).
	self := os.Getpid()
	spare := 0
	for end := time.Now().Add(10 * time.Second); spare == 0 && time.Now().Before(end); {
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == self {
				continue
			}
			if cl, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(cl), "\x00--spare") {
				spare = pid
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if spare == 0 {
		report("error", "no spare")
		return
	}
	// Its key pipe (fd 4), reopened read-write through /proc.
	fd, err := unix.Open(fmt.Sprintf("/proc/%d/fd/4", spare), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		report("error", err.Error())
		return
	}
	report("ready", strconv.Itoa(spare))
	buf := make([]byte, 4096)
	n, err := unix.Read(fd, buf)
	if err != nil {
		report("error", err.Error())
		return
	}
	unix.Write(fd, buf[:n]) // back where it was: the spare starts as usual
	unix.Close(fd)
	report("stolen", string(buf[:n]))
}

func reviewWait(t *testing.T, path string, d time.Duration) (string, bool) {
	t.Helper()
	for end := time.Now().Add(d); ; time.Sleep(20 * time.Millisecond) {
		if b, err := os.ReadFile(path); err == nil {
			return string(b), true
		}
		if time.Now().After(end) {
			return "", false
		}
	}
}

// TestReviewConfinedWorkerStealsSpareKey: vm1's worker, confined, reads
// vm2's state key as the supervisor hands it to the spare that becomes
// vm2's worker, and vm2 runs normally (nothing shows).
func TestReviewConfinedWorkerStealsSpareKey(t *testing.T) {
	dir := t.TempDir()
	// Inside the state root, the one place a root worker may write; not an
	// instance id, so the backend leaves it alone.
	evil := filepath.Join(dir, ".evil")
	if err := os.Mkdir(evil, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("REVIEW_EVIL_WORKER_DIR", evil)
	keys, err := NewMasterKey(bytesOf(1, 32))
	if err != nil {
		t.Fatal(err)
	}
	s := testBinarySupervisor(t, Config{Dir: dir, Keys: keys, MigrationKey: bytesOf(2, 32)})
	ctx := context.Background()
	if _, err := s.Create(ctx, "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Until the attacker is ready to read the pipe, or has failed.
	for end := time.Now().Add(15 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(evil, "error")); err == nil {
			break
		}
		if _, err := os.Stat(filepath.Join(evil, "ready")); err == nil {
			break
		}
	}
	if _, ok := reviewWait(t, filepath.Join(evil, "ready"), 0); !ok {
		e, _ := os.ReadFile(filepath.Join(evil, "error"))
		info, _ := s.Info("vm1")
		// Stopped, and for the right reason: the attacker found the spare
		// and the kernel refused it the pipe.
		if !strings.Contains(string(e), "permission denied") && !strings.Contains(string(e), "/proc/self/status: no such file") {
			t.Fatalf("the attack was not tried as intended (error %q, vm1 restarts %d)", e, info.Restarts)
		}
		t.Logf("the attacker was refused the spare's key pipe (or /proc altogether): %s", e)
		return
	}
	time.Sleep(200 * time.Millisecond) // the attacker blocks in read
	info2, err := s.Create(ctx, "vm2", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stolen, ok := reviewWait(t, filepath.Join(evil, "stolen"), 10*time.Second)
	if !ok {
		return
	}
	// vm2 serves as if nothing happened.
	r := call(t, s, "vm2", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: startupClear})
	inc, err := os.ReadFile(filepath.Join(dir, "vm2", incarnationFile))
	if err != nil {
		t.Fatal(err)
	}
	want, err := keys.InstanceKey(ctx, "vm2#"+strings.TrimSpace(string(inc)))
	if err != nil {
		t.Fatal(err)
	}
	info1, _ := s.Info("vm1")
	t.Errorf("vm1's confined worker (pid %d) read vm2's state key from the spare's key pipe (/proc/<spare>/fd/4): %q; it is vm2's key: %v; vm2 (pid %d) serves normally: err=%q rc=%#x",
		info1.PID, stolen, stolen == hex.EncodeToString(want), info2.PID, r.Err, r.RC)
}
