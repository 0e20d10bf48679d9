package backend

import (
	"bytes"
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/vtpm/tpmrpc"
)

type bindingsMap map[string]*Binding

func (m bindingsMap) Binding(id string) *Binding { return m[id] }

// workloadSim is a simulated CSV chip for a workload VM with measurement
// measure and policy bits policy; it returns the simulator and its root.
func workloadSim(t *testing.T, measure byte, policy uint32) (*csv.Simulator, string) {
	t.Helper()
	sim, err := csv.NewSimulator("SIMWORK01")
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.SetVM(csv.VMConfig{Version: 1, Measure: [32]byte(bytes.Repeat([]byte{measure}, 32)), Policy: policy}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := sim.Save(dir); err != nil {
		t.Fatal(err)
	}
	return sim, filepath.Join(dir, csv.SimRootFile)
}

func bindingJSON(t *testing.T, root, host string, measure byte) []byte {
	b, _ := json.Marshal(map[string]any{"host": host, "workload": map[string]any{
		"simulator_roots": []string{root}, "approved_measurements": []string{strings.Repeat(string("0123456789abcdef"[measure>>4])+string("0123456789abcdef"[measure&15]), 32)}}})
	return b
}

func peer(cn string, sim *csv.Simulator, rd, reportRD [64]byte, t *testing.T) *attestedlink.Peer {
	p := &attestedlink.Peer{Certificate: &x509.Certificate{Subject: pkix.Name{CommonName: cn}}}
	if sim != nil {
		report, err := sim.Report(context.Background(), reportRD[:])
		if err != nil {
			t.Fatal(err)
		}
		p.Workload = &attestedlink.WorkloadEvidence{Report: report, HSKCEK: csv.MarshalHSKCEK(sim.HSK, sim.CEK), ReportData: rd}
	}
	return p
}

// A bound instance serves the guest path only to the workload's own
// evidence, and limits the host path as its binding says.
func TestWorkloadBinding(t *testing.T) {
	good, root := workloadSim(t, 0x77, 0x7)
	dir := t.TempDir()
	aclFile := filepath.Join(dir, "acl.json")
	os.WriteFile(aclFile, []byte(`{"clients": {"frontend": {"instances": ["*"], "capabilities": ["host"]}, "guest-vm1": {"instances": ["*"], "capabilities": ["guest"]}}}`), 0o600)
	acl, err := LoadACL(aclFile)
	if err != nil {
		t.Fatal(err)
	}
	bindings := bindingsMap{}
	for id, host := range map[string]string{"boot": "boot", "full": "full", "none": "none"} {
		if bindings[id], err = ParseBinding(bindingJSON(t, root, host, 0x77)); err != nil {
			t.Fatal(err)
		}
	}
	access := &Access{ACL: acl, Bindings: bindings}
	// The same chip (same root) running other workloads.
	other := sameChip(t, good, 0x66, 0x7)
	debug := sameChip(t, good, 0x77, 0x6)
	rd := attestedlink.WorkloadReportData([]byte("this session's exporter"), []byte("backend nonce"))
	otherSession := attestedlink.WorkloadReportData([]byte("another session"), []byte("backend nonce"))
	for _, tc := range []struct {
		name, instance string
		peer           *attestedlink.Peer
		want           string // "" = allowed
		wantCaps       tpmrpc.Capabilities
	}{
		{"guest cert without workload evidence", "boot", peer("guest-vm1", nil, rd, rd, t), "must prove it is that workload", 0},
		{"the workload", "boot", peer("guest-vm1", good, rd, rd, t), "", tpmrpc.CapCommand | tpmrpc.CapLock},
		{"another workload image", "boot", peer("guest-vm1", other, rd, rd, t), csv.ReasonMeasurement, 0},
		{"a debuggable workload VM", "boot", peer("guest-vm1", debug, rd, rd, t), csv.ReasonDebug, 0},
		{"the workload's report for another session", "boot", peer("guest-vm1", good, rd, otherSession, t), "report_data", 0},
		{"host, host boot", "boot", peer("frontend", nil, rd, rd, t), "", tpmrpc.Roles["host"] | tpmrpc.HostBoot},
		{"host, host full", "full", peer("frontend", nil, rd, rd, t), "", tpmrpc.Roles["host"]},
		{"host, host none", "none", peer("frontend", nil, rd, rd, t), "host path is closed", 0},
		{"guest cert, unbound instance", "unbound", peer("guest-vm1", nil, rd, rd, t), "", tpmrpc.CapCommand},
	} {
		caps, err := access.Authorize(context.Background(), tc.peer, tc.instance)
		switch {
		case tc.want == "" && (err != nil || caps != tc.wantCaps):
			t.Errorf("%s: %v, %v; want %v", tc.name, caps, err, tc.wantCaps)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, %v; want a refusal saying %q", tc.name, caps, err, tc.want)
		}
	}
	for _, bad := range []string{`{"workload": {"approved_measurements": ["` + strings.Repeat("77", 32) + `"]}}`,
		`{"host": "sometimes", "workload": {"approved_measurements": ["` + strings.Repeat("77", 32) + `"]}}`,
		`{"host": "boot", "workload": {}}`, `{"host": "boot", "extra": 1}`} {
		if _, err := ParseBinding([]byte(bad)); err == nil {
			t.Errorf("binding %s accepted", bad)
		}
	}
	if _, err := tpmrpc.ParseCapabilities([]string{"lock-host"}); err == nil {
		t.Error("the ACL granted lock-host by name")
	}
}

// sameChip is good's chip running another workload.
func sameChip(t *testing.T, good *csv.Simulator, measure byte, policy uint32) *csv.Simulator {
	dir := t.TempDir()
	good.Save(dir)
	s, err := csv.LoadSimulator(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetVM(csv.VMConfig{Version: 1, Measure: [32]byte(bytes.Repeat([]byte{measure}, 32)), Policy: policy}); err != nil {
		t.Fatal(err)
	}
	return s
}

// host "boot": once the workload locks the host path, a reset is all the
// host can do; the reset reopens it for the next boot.
func TestHostBootLock(t *testing.T) {
	_, root := workloadSim(t, 0x77, 0x7)
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{Binding: bindingJSON(t, root, "boot", 0x77)}); err != nil {
		t.Fatal(err)
	}
	host := tpmrpc.Roles["host"] | tpmrpc.HostBoot
	getRandom := tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}}
	if r := call(t, s, "vm1", host, getRandom); r.Err != "" {
		t.Fatalf("host before the lock: %+v", r)
	}
	if r := call(t, s, "vm1", tpmrpc.CapCommand, tpmrpc.Request{Op: tpmrpc.OpLockHost}); !strings.Contains(r.Err, "lock-host") {
		t.Fatalf("lock without workload evidence: %+v", r)
	}
	if r := call(t, s, "vm1", tpmrpc.CapCommand|tpmrpc.CapLock, tpmrpc.Request{Op: tpmrpc.OpLockHost}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if r := call(t, s, "vm1", host, getRandom); r.Err == "" {
		t.Fatalf("host command after the lock: %+v", r)
	}
	if r := call(t, s, "vm1", tpmrpc.CapCommand|tpmrpc.CapLock, getRandom); r.Err != "" {
		t.Fatalf("the workload after the lock: %+v", r)
	}
	if r := call(t, s, "vm1", host, tpmrpc.Request{Op: tpmrpc.OpInit}); r.Err != "" || r.RC != 0 {
		t.Fatalf("host reset after the lock: %+v", r)
	}
	if r := call(t, s, "vm1", host, getRandom); r.Err != "" {
		t.Fatalf("host after the reset: %+v", r)
	}
	// The binding is bound into the state key: deleting or editing it
	// makes the instance unopenable, not unbound.
	s.Close()
	dir := filepath.Dir(filepath.Dir(filepath.Join(s.cfg.Dir, "vm1", "x")))
	os.Remove(filepath.Join(dir, "vm1", bindingFile))
	s2 := newSupervisor(t, s.cfg.Dir, 1)
	defer s2.Close()
	if info, _ := s2.Info("vm1"); info.State != StateFailed || !strings.Contains(info.Error, "different key") {
		t.Fatalf("instance with its binding deleted: %+v", info)
	}
}
