package backend

// Second adversarial review (5901d94): a worker taken over after its
// filter is installed stops answering. callWorker arms the worker's
// CallTimeout timer (w.hung) and kills a worker that does not answer, but
// the supervisor's other calls to a worker (freshReport's
// TPM2_ReadPublic, generation for anchorOne and checkNotRolledBack,
// restore) called inst.w.caller.Call directly: the socket is a blocking
// *os.File, so neither the timer nor the context bounded them, and the
// supervisor waited forever with the instance's lock held (fixed: every
// call goes through callWorker).
//
// The workers are this test binary (testworker_test.go: the real
// worker.Run and its filter) plus an "attacker" goroutine that, once
// the filter is on and the test asks (a file named after its pid), stops
// its own process with SIGSTOP (kill to its own pid is on the allow-list).

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"cvtpm/attest/freshreport"
	"cvtpm/vtpm/tpmrpc"
)

func review2Stopper(dir string) {
	trigger := filepath.Join(dir, fmt.Sprintf("stop-%d", os.Getpid()))
	for {
		if _, err := os.Stat(trigger); err == nil {
			os.WriteFile(trigger+".done", []byte("stopping"), 0o600)
			syscall.Kill(os.Getpid(), syscall.SIGSTOP)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReview2StoppedWorkerHoldsInstanceForever: vm1's worker stops itself;
// the host sends the fresh-report vendor command; the supervisor waits for
// the worker's TPM2_ReadPublic answer forever, past CallTimeout, holding
// vm1's lock: the worker is never killed or restarted, and List (every
// instance: `cvtpm backend list`), Delete of vm1 and Close hang with it.
func TestReview2StoppedWorkerHoldsInstanceForever(t *testing.T) {
	dir := t.TempDir()
	evil := filepath.Join(dir, ".evil") // inside the state root; not an instance id
	if err := os.Mkdir(evil, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("REVIEW2_HANG_DIR", evil)
	const timeout = 300 * time.Millisecond
	s := testBinarySupervisor(t, Config{Dir: dir, CallTimeout: timeout})
	ctx := context.Background()
	info, err := s.Create(ctx, "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, "vm2", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pid := info.PID
	released := false
	release := func() {
		if !released {
			released = true
			syscall.Kill(pid, syscall.SIGKILL) // the test's own way out
		}
	}
	t.Cleanup(func() { release(); s.Close() })
	// The attacker stops its worker.
	if err := os.WriteFile(filepath.Join(evil, fmt.Sprintf("stop-%d", pid)), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, ok := reviewWait(t, filepath.Join(evil, fmt.Sprintf("stop-%d.done", pid)), 10*time.Second); !ok {
		t.Fatal("the attacker goroutine did not run in vm1's worker")
	}
	time.Sleep(100 * time.Millisecond)

	cmd := freshreport.Command(freshreport.Request{Nonce: bytesOf(7, 32), EKHandle: 0x81010001, Part: freshreport.PartReport})
	req := tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: cmd})
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	answered := make(chan struct{})
	go func() {
		s.Call(cctx, "vm1", tpmrpc.Roles["host"], req, nil)
		close(answered)
	}()
	listed := make(chan struct{})
	go func() {
		time.Sleep(100 * time.Millisecond) // after the call took vm1's lock
		s.List()
		close(listed)
	}()
	wait := 10 * timeout
	select {
	case <-answered:
		t.Logf("the call returned within %v: the stopped worker was dealt with", wait)
		return
	case <-time.After(wait):
	}
	listHangs := false
	select {
	case <-listed:
	default:
		listHangs = true
	}
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	t.Errorf("vm1's worker (pid %d, stopped by itself: %q) was not killed: the host's fresh-report call to vm1 is still waiting after %v (CallTimeout %v, call context %v), holding vm1's lock; List of all instances hangs too: %v",
		pid, stat, wait, timeout, timeout, listHangs)
	release()
	<-answered
}
