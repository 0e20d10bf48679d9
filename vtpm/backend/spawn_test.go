package backend

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
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

// A worker that refuses its instance for the instance's own sake (here:
// its sealed state is gone) is not tried again with a fresh worker; only
// a spare that died without a word is.
func TestRefusedInstanceNotRetried(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	t.Cleanup(s.Close)
	info, err := s.Create(context.Background(), "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	readySpare(t, s)
	blobs, _ := filepath.Glob(filepath.Join(s.lookup("vm1").dir, "cvtpm.*"))
	if len(blobs) == 0 {
		t.Fatal("vm1 has no sealed state files")
	}
	for _, f := range blobs {
		os.Remove(f)
	}
	before := counterValue(t, workersStarted)
	syscall.Kill(info.PID, syscall.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for {
		i, _ := s.Info("vm1")
		if i.Restarts > 0 && i.PID == 0 && i.Error != "" {
			if !strings.Contains(i.Error, "missing") {
				t.Errorf("vm1's restart failed with %q, want the worker's refusal of the missing state", i.Error)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vm1 was not refused within 10 s: %+v", i)
		}
		time.Sleep(10 * time.Millisecond)
	}
	readySpare(t, s) // the spare taken by the restart is replaced
	if started := counterValue(t, workersStarted) - before; started != 1 {
		t.Errorf("%v workers started for one refused restart, want 1 (the next spare): the refusal was retried", started)
	}
}

func counterValue(t *testing.T, c interface{ Write(*dto.Metric) error }) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// A worker that stops answering (here: stopped with SIGSTOP) is killed
// after CallTimeout, the call fails, and the next call runs on a restarted
// worker; a call that answers in time leaves the worker alone.
func TestHungWorkerKilled(t *testing.T) {
	keys, err := NewMasterKey(bytesOf(1, 32))
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(context.Background(), Config{Dir: t.TempDir(), Keys: keys, CallTimeout: 300 * time.Millisecond,
		Worker: []string{testenv.Binary(t, testenv.Cvtpm), "worker"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	info, err := s.Create(context.Background(), "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tpm := tpmOf(s, "vm1")
	for range 3 { // the timer is re-armed per call, and stopped when it answers
		if resp := tpm.Execute(nil, startupClear); len(resp) < 10 {
			t.Fatalf("TPM2_Startup: %x (%v)", resp, tpm.Err())
		}
	}
	time.Sleep(500 * time.Millisecond)
	if i, _ := s.Info("vm1"); i.PID != info.PID {
		t.Fatalf("a worker that answered in time was replaced: PID %d -> %d", info.PID, i.PID)
	}
	syscall.Kill(info.PID, syscall.SIGSTOP)
	// kill returns before every thread of the worker has stopped; a call
	// sent in between may still be answered (seen once in CI).
	waitStopped(t, info.PID)
	start := time.Now()
	r := call(t, s, "vm1", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: startupClear})
	if took := time.Since(start); r.Err == "" || took > 5*time.Second {
		t.Fatalf("call to a stopped worker: %+v after %v, want an error after about 300 ms", r, took)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if i, _ := s.Info("vm1"); i.PID != 0 && i.PID != info.PID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hung worker was not replaced")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r := call(t, s, "vm1", tpmrpc.Roles["host"], tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: getRandom8}); r.Err != "" {
		t.Fatalf("after the restart: %+v", r)
	}
}

// getRandom8 is TPM2_GetRandom of 8 bytes.
var getRandom8 = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}

// waitStopped waits until every thread of pid is stopped (state "T" in
// /proc/PID/task/TID/stat).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		stopped := len(tasks) > 0
		for _, task := range tasks {
			b, err := os.ReadFile(task)
			if err != nil {
				continue // the thread ended
			}
			s := string(b)
			if f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:]); len(f) == 0 || f[0] != "T" {
				stopped = false
			}
		}
		if stopped {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d not stopped 5 s after SIGSTOP", pid)
		}
		time.Sleep(time.Millisecond)
	}
}
