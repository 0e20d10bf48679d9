package backend

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/tpmrpc"
)

// Review 4, finding 1: DeferManifest is set for every --new worker, also
// for an instance created to receive migrated state (Incoming). Such an
// instance writes no blob until the state arrives, so its directory stays
// without a manifest; when its worker dies (OOM, crash) before then, every
// restart opens the directory as an existing instance (MustExist) and is
// refused ("the sealed state is missing"): the instance can never receive
// its state. Before the change the manifest was written at Open and the
// restarted worker waited for the state as before.
func TestReview4IncomingInstanceSurvivesWorkerRestart(t *testing.T) {
	ctx := context.Background()
	host := tpmrpc.Roles["host"]
	src := newMigratingSupervisor(t, t.TempDir(), 1, 9)
	dst := newMigratingSupervisor(t, t.TempDir(), 2, 9)
	vm1, name := instanceWithNV(t, src, "vm1", 5)
	_ = vm1
	r := call(t, src, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: uint64(engine.StatePermanent)})
	if r.Err != "" || r.RC != 0 {
		t.Fatalf("export: %+v", r)
	}
	perm := r.Payload

	info, err := dst.Create(ctx, "vm1", CreateOptions{Incoming: true})
	if err != nil {
		t.Fatal(err)
	}
	// Let the worker open its store, then it dies before the state comes.
	time.Sleep(200 * time.Millisecond)
	syscall.Kill(info.PID, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if i, _ := dst.Info("vm1"); i.Restarts > 0 && i.PID != 0 && i.PID != info.PID {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the restarted worker opens its store

	r = call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpSetState, Arg: uint64(engine.StatePermanent), Payload: perm})
	if r.Err != "" || r.RC != 0 {
		i, _ := dst.Info("vm1")
		t.Fatalf("loading the migrated state after the incoming instance's worker restarted: %+v (instance %+v)", r, i)
	}
	if r := call(t, dst, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit}); r.Err != "" || r.RC != 0 {
		t.Fatalf("init after migration: %+v", r)
	}
	moved := tpmOf(dst, "vm1")
	startup(t, moved)
	if v, err := readNV(moved, name); err != nil || v != 5 {
		t.Fatalf("NV on the destination = %d, %v; want 5", v, err)
	}
}

// Review 4, finding 2: takeSpare only skips a spare whose exit the
// supervisor has already reaped. A spare that died (OOM killer, crash)
// a moment before it is taken is handed the instance anyway: the flags or
// keys go to a dead process, and Create (or a restart) fails instead of
// starting a fresh worker.
func TestReview4DyingSpareIsNotHandedAnInstance(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	ctx := context.Background()
	var failed []string
	for i := range 10 {
		pid := readySpare(t, s)
		syscall.Kill(pid, syscall.SIGKILL)
		id := fmt.Sprintf("vm%d", i)
		if _, err := s.Create(ctx, id, CreateOptions{}); err != nil {
			failed = append(failed, err.Error())
		}
	}
	if len(failed) > 0 {
		t.Fatalf("%d of 10 creations failed because the spare had just died:\n%s", len(failed), strings.Join(failed, "\n"))
	}
}

// Review 4, finding 3: Close does not wait for a spare that is being
// started when it runs: refillSpare finishes starting it after Close has
// returned and only then discards it, in a goroutine. A worker process
// outlives the supervisor's Close (and one is started after it).
// The test holds syscall.ForkLock so that the spare's fork is in flight
// while Close runs.
func TestReview4CloseEndsStartingSpare(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	readySpare(t, s)
	syscall.ForkLock.RLock()
	locked := true
	unlock := func() {
		if locked {
			syscall.ForkLock.RUnlock()
			locked = false
		}
	}
	defer unlock()
	// Create takes the spare and starts the next one in the background.
	taken := s.takeSpare()
	defer taken.discard()
	for deadline := time.Now().Add(5 * time.Second); ; {
		s.spares.mu.Lock()
		filling := s.spares.filling
		s.spares.mu.Unlock()
		if filling {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no spare being started")
		}
		time.Sleep(100 * time.Microsecond)
	}
	closed := make(chan struct{})
	go func() { s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(time.Second):
		if os.Getenv("R4DUMP") != "" {
			buf := make([]byte, 1<<20)
			t.Logf("%s", buf[:runtime.Stack(buf, true)])
		}
		// Close waits for the spare being started: let it start, and
		// Close must then end it.
		unlock()
		<-closed
	}
	unlock()
	// Whatever Close left behind shows now.
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		if pids := spareChildren(t, taken.w.cmd.Process.Pid); len(pids) > 0 {
			t.Fatalf("spare worker %v started or still running after Close returned", pids)
		}
	}
}

// spareChildren lists this process's live (not zombie) children that run
// a spare worker.
func spareChildren(t *testing.T, except int) []int {
	t.Helper()
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		stat, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if pid == except || len(f) < 2 || f[0] == "Z" || f[1] != fmt.Sprint(os.Getpid()) {
			continue
		}
		cmdline, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if strings.Contains(string(cmdline), "--spare") {
			pids = append(pids, pid)
		}
	}
	return pids
}
