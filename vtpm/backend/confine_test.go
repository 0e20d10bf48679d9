package backend

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/vtpm/tpmrpc"
)

// procStatus reads one field of /proc/PID/status.
func procStatus(t *testing.T, pid int, field string) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("/proc/%d/status has no %s", pid, field)
	return ""
}

// Every worker serves under its seccomp filter (internal/confine), whether
// it was started for its instance or taken as a spare, and what an
// instance does (commands, state written, state leaving and entering)
// stays within it: the worker that served is the one that was started.
// (Every other test's workers run under the filter too.)
func TestWorkersAreConfined(t *testing.T) {
	s := newMigratingSupervisor(t, t.TempDir(), 1, 2)
	ctx := context.Background()
	for _, id := range []string{"vm1", "vm2", "vm3"} {
		info, err := s.Create(ctx, id, CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := procStatus(t, info.PID, "Seccomp"); got != "2" {
			t.Errorf("%s: worker %d runs with Seccomp %s, want 2 (filter)", id, info.PID, got)
		}
		if got := procStatus(t, info.PID, "NoNewPrivs"); got != "1" {
			t.Errorf("%s: worker %d has NoNewPrivs %s, want 1", id, info.PID, got)
		}
	}
	before, _ := s.Info("vm1")
	caps := tpmrpc.Roles["host"]
	exec := func(cmd []byte) []byte {
		r := call(t, s, "vm1", caps, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: cmd})
		if r.Err != "" {
			t.Fatal(r.Err)
		}
		return r.Payload
	}
	exec(startupClear)
	// An NV index written makes the worker seal and write its state.
	def := tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
		NVIndex: 0x01500010, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   32,
	})}
	if _, err := def.Execute(tpmFunc(exec)); err != nil {
		t.Fatal(err)
	}
	// State leaving, sealed for migration. (Loading it is checked by every
	// migration test, whose workers run under the same filter.)
	if r := call(t, s, "vm1", caps, tpmrpc.Request{Op: tpmrpc.OpGetState, Arg: 1}); r.Err != "" || r.RC != 0 || len(r.Payload) == 0 {
		t.Fatalf("get state: %+v", r)
	}
	after, _ := s.Info("vm1")
	if after.PID != before.PID || after.Restarts != 0 {
		t.Fatalf("the worker died on the way (pid %d -> %d, %d restarts): a system call it needs is outside its filter", before.PID, after.PID, after.Restarts)
	}
}

// tpmFunc adapts a command function to go-tpm's transport.
type tpmFunc func([]byte) []byte

func (f tpmFunc) Send(cmd []byte) ([]byte, error) { return f(cmd), nil }
