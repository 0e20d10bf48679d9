package backend

import (
	"context"
	"strings"
	"testing"

	"cvtpm/vtpm/tpmrpc"
)

// Review 2, finding 5: host "boot" - the lock the workload sets after its
// boot is undone by the one operation it leaves the host: a reset (init).
// The host resets the TPM under the running workload (no VM reset: the
// workload's session and proxy live on and are not told), and has the
// whole host role back: it starts the TPM and extends the PCRs to the
// values of a boot of its choosing (or of the genuine boot, replayed, to
// satisfy PCR policies), while the workload goes on using the same TPM.
func TestHostResetUnderLockedWorkloadIsReported(t *testing.T) {
	_, root := workloadSim(t, 0x77, 0x7)
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{Binding: bindingJSON(t, root, "boot", 0x77)}); err != nil {
		t.Fatal(err)
	}
	host := tpmrpc.Roles["host"] | tpmrpc.HostBoot
	workload := tpmrpc.CapCommand | tpmrpc.CapLock
	startupCmd := tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: startupClear}
	// PCR_Extend(8, password session, SHA-256 digest 0x11..)
	extend := []byte{0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x82, 0, 0, 0, 8, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0x0b}
	for i := 0; i < 32; i++ {
		extend = append(extend, 0x11)
	}
	extend[5] = byte(len(extend))
	// The boot ran through the host path; the workload is up and locks.
	if r := call(t, s, "vm1", host, startupCmd); r.Err != "" {
		t.Fatal(r.Err)
	}
	if r := call(t, s, "vm1", workload, tpmrpc.Request{Op: tpmrpc.OpLockHost}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if r := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: extend}); r.Err == "" {
		t.Fatal("premise: host command after the lock")
	}
	// The host, while the workload runs: init, startup, extend.
	rInit := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit})
	rStart := call(t, s, "vm1", host, startupCmd)
	rExt := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: extend})
	t.Logf("host after the lock: init %+v; startup err=%q; PCR_Extend err=%q rc=%#x", rInit, rStart.Err, rExt.Err, responseCode(rExt.Payload))
	// The workload's session is still there and works on the host's TPM.
	rw := call(t, s, "vm1", workload, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}})
	t.Logf("workload afterwards: err=%q rc=%#x", rw.Err, responseCode(rw.Payload))
	// The host may reset (a VM reset needs it) and then use the TPM for
	// the next boot; but the running workload is told, on every call, that
	// the TPM is no longer its own, until it locks again after its reboot.
	if rw.Err == "" || !strings.Contains(rw.Err, "the host reset the TPM after the workload locked it") {
		t.Errorf("the workload goes on using a TPM the host reset and extended under it: %+v", rw)
	}
	if r := call(t, s, "vm1", workload, tpmrpc.Request{Op: tpmrpc.OpLockHost}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if r := call(t, s, "vm1", workload, startupCmd); r.Err != "" {
		t.Errorf("the workload after locking again: %+v", r)
	}
}
