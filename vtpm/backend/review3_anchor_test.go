package backend

// Third adversarial review, finding: one taken-over worker stops every
// instance of the backend. anchorNow asks the workers for their
// generations one after another, in the loop whose report is also the
// heartbeat that keeps every instance serving (MaxUnanchored, 10 s by
// default). An instance busy with a long command is skipped (TryLock), but
// an idle worker that simply answers OpGeneration late holds the loop for
// as long as it likes below CallTimeout (2 minutes by default), and is not
// killed for it: no report reaches the broker meanwhile, and past
// MaxUnanchored the supervisor refuses every call to every instance. The
// attacker repeats it on every round; the README says a libtpms bug gets
// "at most that one worker process".

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

func TestReview3SlowGenerationStopsEveryInstance(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, ".review3") // inside the state root; not an instance id
	if err := os.Mkdir(ctl, 0o700); err != nil {
		t.Fatal(err)
	}
	const callTimeout = 2 * time.Second
	t.Setenv("REVIEW3_MODE", "slowgen")
	t.Setenv("REVIEW3_CTL", ctl)
	t.Setenv("REVIEW3_EVIL_ID", "vm1")
	t.Setenv("REVIEW3_DELAY", (callTimeout * 8 / 10).String())

	broker := newFakeBroker(t)
	owned, moved := broker.owned(t, "a")
	s := testBinarySupervisor(t, Config{Dir: dir,
		MigrationKey: bytesOf(9, 32), Anchors: owned, Moved: moved, Anchorer: broker.view(t, "a"),
		AnchorInterval: 20 * time.Millisecond, MaxUnanchored: 300 * time.Millisecond, CallTimeout: callTimeout})
	ctx := context.Background()
	info1, err := s.Create(ctx, "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, "vm2", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	vm2 := tpmOf(s, "vm2")
	startup(t, vm2)
	probe := func(d time.Duration) (ok, refused int, why string) {
		for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(vm2); err != nil {
				refused++
				why = err.Error()
			} else {
				ok++
			}
		}
		return
	}
	if ok, refused, why := probe(time.Second); refused > 0 {
		t.Fatalf("before the attack vm2 already failed %d of %d calls: %s", refused, ok+refused, why)
	}
	// vm1's worker (taken over) starts answering OpGeneration late.
	if err := os.WriteFile(filepath.Join(ctl, "slow"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ok, refused, why := probe(3 * callTimeout)
	info1b, _ := s.Info("vm1")
	t.Logf("vm2 during the attack: %d calls served, %d refused (%s); vm1's worker pid %d -> %d (%s)",
		ok, refused, why, info1.PID, info1b.PID, info1b.State)
	if refused > 0 {
		t.Errorf("vm1's worker, answering only its generation calls %v late (below CallTimeout %v), made the backend refuse %d of %d calls to vm2 (%q), and was not killed for it (pid %d -> %d): one taken-over worker denies service to every instance",
			callTimeout*8/10, callTimeout, refused, ok+refused, why, info1.PID, info1b.PID)
	}
	if !strings.Contains(why, "key broker has not recorded") && refused > 0 {
		t.Logf("unexpected refusal reason: %s", why)
	}
}
