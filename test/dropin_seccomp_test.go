package test

import (
	"context"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// TestDropInSeccomp: the swtpm drop-in (what libvirt runs as swtpm, and
// `cvtpm socket`, which execs it) confines itself with a seccomp filter
// unless told --seccomp action=none, as swtpm does by default: a libtpms
// bug reached by a guest's commands then runs, on the host, with no more
// than serving its TPM takes (no exec, no new socket or connection, no
// ioctl, no other process; internal/confine's TestDropInFilterProgram has
// the list). The TPM works under it, with its state written and read
// again: every other test of the drop-in (libvirt, QEMU, swtpm_setup,
// tpm2-tools) runs it with the default too.
func TestDropInSeccomp(t *testing.T) {
	for _, c := range []struct {
		name     string
		args     []string
		filtered bool
	}{
		{"default", nil, true},
		{"action=kill", []string{"--seccomp", "action=kill"}, true},
		{"action=log", []string{"--seccomp", "action=log"}, true},
		{"action=none", []string{"--seccomp", "action=none"}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{ExtraArgs: c.args})
			conn, err := tpmsock.Dial(context.Background(), "unix", srv.DataPath)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			// NV_DefineSpace: a sealed state write (temp file, fsync,
			// rename, directory fsync, manifest) under the filter.
			def := tpm2.NVDefineSpace{
				AuthHandle: tpm2.TPMRHOwner,
				PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
					NVIndex: 0x01500042, NameAlg: tpm2.TPMAlgSHA256, DataSize: 8,
					Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary},
				}),
			}
			if _, err := def.Execute(conn); err != nil {
				t.Fatalf("NV_DefineSpace under the filter: %v\n%s", err, srv.Log)
			}
			if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(conn); err != nil {
				t.Fatalf("GetRandom: %v", err)
			}
			// Read once the TPM has answered: the filter goes on after the
			// sockets listen, before the state is read and anything served.
			pid := srv.Cmd.Process.Pid
			mode, err := testenv.ProcStatus(pid, "Seccomp")
			if err != nil {
				t.Fatal(err)
			}
			noNewPrivs, _ := testenv.ProcStatus(pid, "NoNewPrivs")
			if want := map[bool]string{true: "2", false: "0"}[c.filtered]; mode != want {
				t.Errorf("Seccomp: %s in /proc/%d/status, want %s (2: a filter)", mode, pid, want)
			}
			if c.filtered && noNewPrivs != "1" {
				t.Errorf("NoNewPrivs: %s, want 1", noNewPrivs)
			}
			conn.Close()
			srv.Stop(t)
			if !srv.Exited() || srv.Cmd.ProcessState == nil || !srv.Cmd.ProcessState.Success() {
				t.Errorf("the drop-in did not end cleanly on SIGTERM under the filter: %v\n%s", srv.Cmd.ProcessState, srv.Log)
			}
		})
	}
}
