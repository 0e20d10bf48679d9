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
		for _, f := range []string{"CapEff", "CapPrm", "CapBnd", "CapAmb"} {
			if got := procStatus(t, info.PID, f); strings.Trim(got, "0") != "" {
				t.Errorf("%s: worker %d has %s %s, want none", id, info.PID, f, got)
			}
		}
		// A mount namespace of its own, whose root holds the state
		// directory and nothing else.
		mine, _ := os.Readlink("/proc/self/ns/mnt")
		its, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", info.PID))
		if err != nil || its == mine {
			t.Errorf("%s: worker %d shares the backend's mount namespace (%s, %v)", id, info.PID, its, err)
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/root/etc", info.PID)); err == nil {
			t.Errorf("%s: worker %d sees /etc", id, info.PID)
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

// The migration key stays in the supervisor: a worker (which runs libtpms
// on the host's commands) is given neither the key nor a descriptor to
// read it from, and what it exports leaves the backend only sealed
// (TestMigrationBetweenBackends checks the envelopes).
func TestWorkerNeverHoldsMigrationKey(t *testing.T) {
	s := newMigratingSupervisor(t, t.TempDir(), 1, 2)
	info, err := s.Create(context.Background(), "vm1", CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", info.PID))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(cmdline), "migration") {
		t.Errorf("worker command line names a migration key: %q", cmdline)
	}
	// Descriptors the worker holds: stdio, its socket, the state key's pipe
	// (read and closed at start) and what it opens itself (its state
	// directory and lock, the runtime's epoll). No second pipe.
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", info.PID))
	if err != nil {
		t.Fatal(err)
	}
	pipes := 0
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", info.PID, fd.Name())); err == nil && strings.HasPrefix(target, "pipe:") {
			pipes++
		}
	}
	// stdout and stderr may be pipes (the test harness's and the
	// supervisor's); a key pipe left open would be one more.
	if pipes > 2 {
		t.Errorf("worker holds %d pipes: a key pipe was left open", pipes)
	}
}
