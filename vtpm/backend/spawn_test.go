package backend

import (
	"context"
	"syscall"
	"testing"
	"time"
)

// readySpare waits until the supervisor has a spare worker and returns its PID.
func readySpare(t *testing.T, s *Supervisor) int {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		s.spares.mu.Lock()
		sp := s.spares.ready
		s.spares.mu.Unlock()
		if sp != nil {
			return sp.w.cmd.Process.Pid
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("no spare worker within 10 s")
	return 0
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

// An instance is created in the worker started ahead of need, a new spare
// follows, a spare that died idle is not used, and Close ends the spare.
func TestSpareWorker(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	ctx := context.Background()

	spare := readySpare(t, s)
	info, err := s.Create(ctx, "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if info.PID != spare {
		t.Errorf("vm1 runs in PID %d, want the spare %d", info.PID, spare)
	}
	if resp := tpmOf(s, "vm1").Execute(nil, startupClear); responseCode(resp) != 0 {
		t.Fatalf("TPM2_Startup on the spare-made instance: rc %#x", responseCode(resp))
	}

	next := readySpare(t, s)
	if next == spare {
		t.Fatal("the used spare is still the spare")
	}
	syscall.Kill(next, syscall.SIGKILL)
	for alive(next) {
		time.Sleep(5 * time.Millisecond)
	}
	info, err = s.Create(ctx, "vm2", CreateOptions{})
	if err != nil {
		t.Fatalf("creating after the spare died: %v", err)
	}
	if info.PID == next {
		t.Fatal("vm2 was given the dead spare")
	}
	if resp := tpmOf(s, "vm2").Execute(nil, startupClear); responseCode(resp) != 0 {
		t.Fatalf("TPM2_Startup on vm2: rc %#x", responseCode(resp))
	}

	last := readySpare(t, s)
	s.Close()
	deadline := time.Now().Add(5 * time.Second)
	for alive(last) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	// A dead child stays a zombie until waited for; the supervisor waits.
	if alive(last) {
		t.Errorf("the spare worker %d outlived the supervisor's Close", last)
	}
}
