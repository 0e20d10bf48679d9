package test

// Issue 10: the host is the adversary. These tests play the host with the
// real tools (swtpm_ioctl on the frontend's QEMU socket, a real swtpm, the
// file system under the backend) against real processes, and check that
// every attack fails with a reason while the guest's data stays intact.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/test/testenv"
)

// hostEnv is an EK CA, backend A (with a migration key) holding vm1
// (enrolled) and vm2, a frontend serving both to "QEMU", and the guest's
// own session to vm1.
type hostEnv struct {
	files    *testenv.TopologyFiles
	topo     *testenv.Topology
	caDir    string
	migKey   string
	ctrl     map[string]string // instance -> frontend control socket
	guest    tools
	dir      string
	secret   []byte
	password string
}

const secretIndex = "0x1500020"

func startHostEnv(t *testing.T) *hostEnv {
	t.Helper()
	f := testenv.NewTopologyFiles(t, 0x7)
	e := &hostEnv{files: f, caDir: filepath.Join(f.Dir, "ca"), ctrl: map[string]string{}, dir: t.TempDir(),
		password: "guest-own-pw-" + randHex(4)}
	e.secret = []byte("tenant secret " + randHex(16))
	e.migKey = filepath.Join(f.Dir, "migration.key")
	os.WriteFile(e.migKey, []byte(randHex(32)+"\n"), 0o600)
	c := startCAProc(t, e.caDir, f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	e.topo = testenv.StartBackend(t, f, append(c.ClientFlags(), "--migration-key-file", e.migKey)...)
	e.topo.Admin(t, "create", "--enroll", "vm1")
	e.topo.Admin(t, "create", "vm2")
	e.ctrl = startFrontend(t, f, e.topo, "vm1", "vm2")
	_, tcti := e.topo.StartGuestProxy(t, e.topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	e.guest = tools{tb: t, tcti: tcti, dir: e.dir}
	return e
}

// startFrontend serves instances to "QEMU" on unix control sockets.
func startFrontend(t *testing.T, f *testenv.TopologyFiles, topo *testenv.Topology, instances ...string) map[string]string {
	t.Helper()
	ctrl := map[string]string{}
	args := []string{"frontend", "--backend", topo.LinkAddr, "--tls-cert", f.Certs["frontend"][0], "--tls-key", f.Certs["frontend"][1], "--policy", f.Policy, "--cert-dir", f.CertDir}
	var addrs []string
	for _, id := range instances {
		ctrl[id] = filepath.Join(testenv.SockDir(t), id+".ctrl")
		args = append(args, "--vm", id+"="+ctrl[id])
		addrs = append(addrs, "unix:"+ctrl[id])
	}
	testenv.StartDaemon(t, "frontend", addrs, args...)
	return ctrl
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// hostIoctl runs swtpm_ioctl on a frontend control socket, as the host can.
func hostIoctl(sock string, args ...string) (string, error) {
	return testenv.RunErr(nil, "swtpm_ioctl", append([]string{"--unix", sock}, args...)...)
}

func mustHostIoctl(t *testing.T, sock string, args ...string) {
	t.Helper()
	if out, err := hostIoctl(sock, args...); err != nil {
		t.Fatalf("swtpm_ioctl %v: %v\n%s", args, err, out)
	}
}

// writeSecret has the guest store a secret in NV under its own password.
func (e *hostEnv) writeSecret(t *testing.T) {
	size := strconv.Itoa(len(e.secret))
	os.WriteFile(e.guest.path("secret"), e.secret, 0o600)
	e.guest.run("tpm2_nvdefine", secretIndex, "-C", "o", "-s", size, "-a", "authread|authwrite", "-p", e.password)
	e.guest.run("tpm2_nvwrite", secretIndex, "-P", e.password, "-i", e.guest.path("secret"))
}

// readSecret reads the guest's secret through tcti (TPM2_Startup first if
// the TPM was reset).
func (e *hostEnv) readSecret(t *testing.T, tcti string) []byte {
	t.Helper()
	tt := tools{tb: t, tcti: tcti, dir: e.dir}
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_startup", "-c") // fails harmlessly if started
	out := tt.path("secret.out")
	os.Remove(out)
	tt.run("tpm2_nvread", secretIndex, "-P", e.password, "-s", strconv.Itoa(len(e.secret)), "-o", out)
	got, _ := os.ReadFile(out)
	return got
}

// The host takes state through QEMU's socket: what it gets is sealed (no
// secret, no password, no key), and neither swtpm nor a plain cvtpm can
// run it.
func TestHostCannotReadOrCloneState(t *testing.T) {
	e := startHostEnv(t)
	e.writeSecret(t)
	ctrl := e.ctrl["vm1"]
	var taken [][]byte
	for _, blob := range []string{"permanent", "volatile", "savestate"} {
		file := filepath.Join(e.dir, "stolen."+blob)
		if out, err := hostIoctl(ctrl, "--save", blob, file); err != nil {
			if blob == "savestate" { // there is none while the VM runs
				continue
			}
			t.Fatalf("--save %s: %v\n%s", blob, err, out)
		}
		b, _ := os.ReadFile(file)
		taken = append(taken, b)
		for _, secret := range [][]byte{e.secret, []byte(e.password)} {
			if bytes.Contains(b, secret) {
				t.Fatalf("the %s blob the host took holds %q in clear", blob, secret)
			}
		}
	}
	if len(taken) < 2 || len(taken[0]) < 1000 {
		t.Fatalf("the host got %d blobs; want sealed permanent and volatile state", len(taken))
	}
	// A clone outside the TEE: load the stolen blobs into a real swtpm and
	// into a plain cvtpm socket.
	for _, impl := range []testenv.Impl{testenv.Swtpm, testenv.Cvtpm} {
		srv := testenv.StartSocket(t, impl, testenv.Options{})
		ioctl(t, srv, "--stop")
		out, err := testenv.RunErr(nil, "swtpm_ioctl", "--unix", srv.CtrlPath, "--load", "permanent", filepath.Join(e.dir, "stolen.permanent"))
		if err == nil {
			t.Fatalf("%s loaded the stolen permanent state:\n%s", impl, out)
		}
		t.Logf("%s refuses the stolen state: %s", impl, strings.TrimSpace(out))
	}
}

// The host loads state of its own choosing through QEMU's socket: a real
// swtpm's state (seeds it knows), garbage, another instance's sealed
// state, an older sealed state of the same instance. Each is refused, and
// the guest still reads its secret afterwards.
func TestHostCannotReplaceState(t *testing.T) {
	e := startHostEnv(t)
	ctrl := e.ctrl["vm1"]
	older := filepath.Join(e.dir, "older.permanent")
	mustHostIoctl(t, ctrl, "--save", "permanent", older)
	e.writeSecret(t)
	other := filepath.Join(e.dir, "vm2.permanent")
	mustHostIoctl(t, e.ctrl["vm2"], "--save", "permanent", other)
	hostMade := filepath.Join(e.dir, "swtpm.permanent")
	sw := testenv.StartSocket(t, testenv.Swtpm, testenv.Options{})
	ioctl(t, sw, "--save", "permanent", hostMade)
	garbage := filepath.Join(e.dir, "garbage")
	g := make([]byte, 1000)
	rand.Read(g)
	os.WriteFile(garbage, g, 0o600)
	// garbage in a valid swtpm blob header (version 2, migration data TLV)
	framed := filepath.Join(e.dir, "framed-garbage")
	hdr := []byte{2, 1, 0, 10, 0, 4, 0, 0, 0, 0}
	tlv := append([]byte{0, 4, 0, 0, 0, 0}, append([]byte{0, 1, 0, 0, 0x03, 0xe8}, g...)...)
	tlv[5] = byte(len(tlv) - 6)
	tlv[4] = byte((len(tlv) - 6) >> 8)
	blob := append(hdr, tlv...)
	blob[9], blob[8] = byte(len(blob)), byte(len(blob)>>8)
	os.WriteFile(framed, blob, 0o600)

	mustHostIoctl(t, ctrl, "--stop")
	for _, tc := range []struct{ name, file string }{
		{"a real swtpm's state", hostMade},
		{"garbage", garbage},
		{"garbage in a swtpm blob header", framed},
		{"another instance's sealed state", other},
		{"an older sealed state of the same instance", older},
	} {
		if out, err := hostIoctl(ctrl, "--load", "permanent", tc.file); err == nil {
			t.Errorf("the host loaded %s:\n%s", tc.name, out)
		}
	}
	mustHostIoctl(t, ctrl, "-i")
	if got := e.readSecret(t, e.guest.tcti); !bytes.Equal(got, e.secret) {
		t.Fatalf("after the refused loads the guest reads %q, want %q", got, e.secret)
	}
	// The reasons are in the backend's log.
	for _, want := range []string{"not a state blob sealed by a cvtpm backend", "sealed for another instance", "not newer than the instance's state"} {
		if !e.topo.Backend.Logged(want) {
			t.Errorf("backend log does not say %q", want)
		}
	}
	// H-CRTM and locality 4 are not the host's.
	if out, err := hostIoctl(ctrl, "-l", "4"); err == nil {
		t.Errorf("the host set locality 4:\n%s", out)
	}
	if out, err := hostIoctl(ctrl, "-h", "host-chosen-crtm"); err == nil {
		t.Errorf("the host ran an H-CRTM sequence:\n%s", out)
	}
	if !e.topo.Backend.Logged(`needs the \"hcrtm\" capability`) {
		t.Errorf("backend log does not name the hcrtm refusal:\n%s", e.topo.Backend.Log.String())
	}
}

// The host edits the disk under the backend: one instance's manifest is
// deleted, another's sealed state replaced by plaintext swtpm state. After
// a backend restart those two are refused with the reason, the third
// serves its secret.
func TestHostCannotPlantState(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	for _, id := range []string{"vm1", "vm2", "vm3"} {
		topo.Admin(t, "create", id)
	}
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "frontend", "vm3", f.Policy)
	e := &hostEnv{dir: t.TempDir(), secret: []byte("vm3 secret"), password: "pw3"}
	e.guest = tools{tb: t, tcti: tcti, dir: e.dir}
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_startup", "-c")
	e.writeSecret(t)
	topo.Backend.Stop()
	os.Remove(filepath.Join(topo.StateDir, "vm1", "cvtpm.manifest"))
	files, _ := filepath.Glob(filepath.Join(topo.StateDir, "vm2", "cvtpm.*"))
	for _, file := range files {
		os.Remove(file)
	}
	sw := testenv.StartSocket(t, testenv.Swtpm, testenv.Options{})
	ioctl(t, sw, "--save", "permanent", filepath.Join(topo.StateDir, "vm2", "tpm2-00.permall"))
	topo.RestartBackend(t)
	list := topo.Admin(t, "list")
	for _, want := range []string{"cvtpm.manifest missing", "refusing to import it implicitly"} {
		if !strings.Contains(list, want) {
			t.Errorf("backend list does not say %q:\n%s", want, list)
		}
	}
	_, tcti = topo.StartGuestProxy(t, topo.LinkAddr, "frontend", "vm3", f.Policy)
	if got := e.readSecret(t, tcti); !bytes.Equal(got, e.secret) {
		t.Fatalf("vm3 after the restart reads %q", got)
	}
}

// QEMU's migration path between two backends (two simulated chips, the
// same policy and migration key): swtpm_ioctl --save on the source
// frontend, --load on the destination frontend, as QEMU does it. The
// state is sealed in transit, and on the destination the guest reads its
// secret and the EK certificate still verifies.
func TestMigrationBetweenBackends(t *testing.T) {
	e := startHostEnv(t)
	e.writeSecret(t)
	g := testenv.NewTopologyFiles(t, 0x7) // another chip
	os.MkdirAll(filepath.Join(g.Dir, "b"), 0o700)
	dst := testenv.StartBackend(t, g, "--migration-key-file", e.migKey)
	dst.Admin(t, "create", "--incoming", "vm1")
	dctrl := startFrontend(t, g, dst, "vm1")
	mustHostIoctl(t, dctrl["vm1"], "--stop")
	for _, blob := range []string{"permanent", "volatile"} {
		file := filepath.Join(e.dir, "mig."+blob)
		mustHostIoctl(t, e.ctrl["vm1"], "--save", blob, file)
		if b, _ := os.ReadFile(file); bytes.Contains(b, e.secret) {
			t.Fatalf("%s state in transit holds the secret", blob)
		}
		mustHostIoctl(t, dctrl["vm1"], "--load", blob, file)
	}
	mustHostIoctl(t, dctrl["vm1"], "-i")
	_, tcti := dst.StartGuestProxy(t, dst.LinkAddr, "guest-vm1", "vm1", g.Policy)
	if got := e.readSecret(t, tcti); !bytes.Equal(got, e.secret) {
		t.Fatalf("the migrated guest reads %q, want %q", got, e.secret)
	}
	tt := tools{tb: t, tcti: tcti, dir: e.dir}
	tt.run("tpm2_nvread", "0x01c00002", "-o", tt.path("ek.der"))
	out := testenv.Run(t, nil, "openssl", "verify", "-CAfile", filepath.Join(e.caDir, "ca.pem"), tt.path("ek.der"))
	if !strings.Contains(out, "OK") {
		t.Fatalf("EK certificate on the destination: %s", out)
	}
	// A second load of the same (now older) export is refused there.
	mustHostIoctl(t, dctrl["vm1"], "--stop")
	if out, err := hostIoctl(dctrl["vm1"], "--load", "permanent", filepath.Join(e.dir, "mig.permanent")); err == nil {
		t.Errorf("the destination took the migrated state twice:\n%s", out)
	}
	_ = context.Background
}

// brokerArgs are a backend's flags for keys from the broker at addr, in
// migration domain prod.
func brokerArgs(addr, root, id string) []string {
	return []string{"--key-broker", addr, "--broker-root", root, "--backend-id", id, "--migration-domain", "prod"}
}

// startBroker runs `cvtpm ca --key-broker` with the topology's policy and
// returns its address and service root (what signs its answers and TLS).
func startBroker(t *testing.T, f *testenv.TopologyFiles, extra ...string) (addr, root string) {
	t.Helper()
	dir := filepath.Join(f.Dir, "ca")
	addr = fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	testenv.StartDaemon(t, "ca+broker", []string{"tcp:" + addr}, append([]string{"ca", "--dir", dir, "--policy", f.Policy,
		"--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile), "--listen", addr, "--http", "", "--key-broker"}, extra...)...)
	return addr, filepath.Join(dir, "service-ca.pem")
}

// The backend's keys come from the key broker on evidence: an approved
// backend starts and serves; the same chip running an image the policy
// does not approve gets nothing. An old copy of an instance's directory put
// back by the host is refused against the anchored generation.
func TestKeyBroker(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	addr, root := startBroker(t, f)
	args := brokerArgs(addr, root, "backend-a")
	// The same chip, an image the policy does not approve.
	sim, err := csv.LoadSimulator(f.SimDir)
	if err != nil {
		t.Fatal(err)
	}
	var other [32]byte
	sim.SetVM(csv.VMConfig{Version: 1, Measure: other, Policy: 0x7})
	otherDir := filepath.Join(f.Dir, "other-image")
	if err := sim.Save(otherDir); err != nil {
		t.Fatal(err)
	}
	out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), append([]string{"backend", "--dir", filepath.Join(f.Dir, "other-state"),
		"--listen", fmt.Sprintf("tcp:127.0.0.1:%d", testenv.FreePort(t)), "--client-ca", f.ClientCA, "--acl", f.ACL, "--csv-sim", otherDir}, args...)...)
	if err == nil || !strings.Contains(out, "key release refused: "+csv.ReasonMeasurement) {
		t.Fatalf("a backend running an unapproved image: err=%v\n%s", err, out)
	}

	topo := testenv.StartBackend(t, f, args...)
	if strings.Contains(topo.Backend.Log.String(), "development setup") {
		t.Errorf("a backend with keys from the broker warns of a development setup")
	}
	topo.Admin(t, "create", "vm1")
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	e := &hostEnv{dir: t.TempDir(), secret: []byte("broker-sealed secret"), password: "pw"}
	e.guest = tools{tb: t, tcti: tcti, dir: e.dir}
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_startup", "-c")
	e.writeSecret(t)
	topo.Backend.Stop()
	old := filepath.Join(f.Dir, "vm1-old")
	copyTree(t, filepath.Join(topo.StateDir, "vm1"), old)
	topo.RestartBackend(t) // the same keys again: the secret is there
	_, tcti = topo.StartGuestProxy(t, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	e.guest.tcti = tcti
	if got := e.readSecret(t, tcti); !bytes.Equal(got, e.secret) {
		t.Fatalf("after a restart with keys from the broker: %q", got)
	}
	e.guest.run("tpm2_nvwrite", secretIndex, "-P", e.password, "-i", e.guest.path("secret"))
	topo.Backend.Stop() // anchors the last generation
	os.RemoveAll(filepath.Join(topo.StateDir, "vm1"))
	copyTree(t, old, filepath.Join(topo.StateDir, "vm1"))
	topo.RestartBackend(t)
	if list := topo.Admin(t, "list"); !strings.Contains(list, "state rolled back") {
		t.Fatalf("an old copy of vm1's directory was accepted:\n%s", list)
	}
}

func copyTree(t *testing.T, from, to string) {
	t.Helper()
	os.MkdirAll(to, 0o700)
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == ".lock" {
			continue
		}
		b, _ := os.ReadFile(filepath.Join(from, e.Name()))
		os.WriteFile(filepath.Join(to, e.Name()), b, 0o600)
	}
}

// Migration between two backends whose keys come from the key broker (one
// migration domain): QEMU's path with swtpm_ioctl works, the source hands
// the instance over and its stale copy stops, and an export the host kept
// from before the guest's last write is refused at the destination.
func TestMigrationWithKeyBroker(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	addr, root := startBroker(t, f)
	src := testenv.StartBackend(t, f, brokerArgs(addr, root, "backend-a")...)
	dst := testenv.StartBackendAt(t, f, filepath.Join(f.Dir, "state-b"), brokerArgs(addr, root, "backend-b")...)
	src.Admin(t, "create", "vm1")
	sctrl := startFrontend(t, f, src, "vm1")["vm1"]
	_, tcti := src.StartGuestProxy(t, src.LinkAddr, "guest-vm1", "vm1", f.Policy)
	e := &hostEnv{dir: t.TempDir(), secret: []byte("first secret"), password: "pw"}
	e.guest = tools{tb: t, tcti: tcti, dir: e.dir}
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_startup", "-c")
	e.writeSecret(t)
	// The host keeps an export, then the guest writes a newer secret.
	old := filepath.Join(e.dir, "old.permanent")
	mustHostIoctl(t, sctrl, "--save", "permanent", old)
	e.secret = []byte("newer secret")
	os.WriteFile(e.guest.path("secret"), e.secret, 0o600)
	e.guest.run("tpm2_nvwrite", secretIndex, "-P", e.password, "-i", e.guest.path("secret"))

	dst.Admin(t, "create", "--incoming", "vm1")
	// The destination's frontend serves an instance that exists.
	dctrl := startFrontend(t, f, dst, "vm1")["vm1"]
	mustHostIoctl(t, dctrl, "--stop")
	if out, err := hostIoctl(dctrl, "--load", "permanent", old); err == nil {
		t.Fatalf("the destination loaded an export older than the guest's last write:\n%s", out)
	}
	// Refused either at once (the source already reported its newer
	// generation) or when the source reports it (within its report
	// interval, which may end after the host's call has given up).
	saysWhy := func() bool {
		l := dst.Backend.Log.String()
		return strings.Contains(l, "has newer state than the claimed export") || strings.Contains(l, "older than the instance's anchored generation")
	}
	for deadline := time.Now().Add(10 * time.Second); !saysWhy() && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if !saysWhy() {
		t.Errorf("destination log does not say why:\n%s", dst.Backend.Log.String())
	}
	// The real migration: QEMU pauses the source VM, saves, loads.
	for _, blob := range []string{"permanent", "volatile"} {
		mustHostIoctl(t, sctrl, "--save", blob, filepath.Join(e.dir, "mig."+blob))
	}
	for _, blob := range []string{"permanent", "volatile"} {
		file := filepath.Join(e.dir, "mig."+blob)
		if out, err := hostIoctl(dctrl, "--load", blob, file); err != nil {
			t.Fatalf("--load %s at the destination: %v\n%s\ndestination log:\n%s", blob, err, out, dst.Backend.Log.String())
		}
	}
	mustHostIoctl(t, dctrl, "-i")
	_, dtcti := dst.StartGuestProxy(t, dst.LinkAddr, "guest-vm1", "vm1", f.Policy)
	if got := e.readSecret(t, dtcti); !bytes.Equal(got, e.secret) {
		t.Fatalf("the migrated guest reads %q, want %q", got, e.secret)
	}
	// The source's copy is stale now: it serves nothing and gives nothing.
	if out, err := hostIoctl(sctrl, "--save", "permanent", filepath.Join(e.dir, "stale")); err == nil {
		t.Errorf("the stale source copy gave its state:\n%s", out)
	}
	if list := src.Admin(t, "list"); !strings.Contains(list, "migrated to backend backend-b") {
		t.Errorf("source list:\n%s", list)
	}
}

// An instance bound to its workload VM, through the real processes: the
// guest proxy's certificate alone no longer reaches it, nor does another
// workload image or a debuggable workload VM; the workload proving itself
// with its own CSV report does, and can lock the host path ("boot") until
// the next VM reset.
func TestWorkloadBindingEndToEnd(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	workloadMeasure := strings.Repeat("77", 32)
	mkSim := func(name string, measure string, policy uint32) string {
		dir := filepath.Join(f.Dir, name)
		var m [32]byte
		b, _ := hex.DecodeString(measure)
		copy(m[:], b)
		sim, err := csv.LoadSimulator(f.SimDir) // the same (simulated) chip as the backend
		if err != nil {
			t.Fatal(err)
		}
		sim.SetVM(csv.VMConfig{Version: 1, Measure: m, Policy: policy})
		if err := sim.Save(dir); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	good := mkSim("workload", workloadMeasure, 0x7)
	other := mkSim("other-workload", strings.Repeat("66", 32), 0x7)
	debug := mkSim("debug-workload", workloadMeasure, 0x6)
	binding := filepath.Join(f.Dir, "binding.json")
	os.WriteFile(binding, []byte(fmt.Sprintf(`{"host": "boot", "workload": {"simulator_roots": [%q], "approved_measurements": [%q]}}`,
		filepath.Join(f.SimDir, csv.SimRootFile), workloadMeasure)), 0o600)
	if out := topo.Admin(t, "create", "--bind", binding, "vm1"); !strings.Contains(out, "bound to its workload VM") {
		t.Fatalf("create --bind: %s", out)
	}
	ctrl := startFrontend(t, f, topo, "vm1")["vm1"]
	proxy := func(extra ...string) string {
		port := testenv.FreePort(t)
		c := f.Certs["guest-vm1"]
		testenv.StartDaemon(t, "guest proxy", []string{fmt.Sprintf("tcp:127.0.0.1:%d", port)}, append([]string{"guest", "proxy",
			"--link", topo.LinkAddr, "--instance", "vm1", "--tls-cert", c[0], "--tls-key", c[1], "--policy", f.Policy, "--cert-dir", f.CertDir,
			"--tcp", fmt.Sprintf("127.0.0.1:%d", port)}, extra...)...)
		return fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port)
	}
	getRandom := func(tcti string) error {
		_, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_getrandom", "8")
		return err
	}
	for _, tc := range []struct {
		name, want string
		args       []string
	}{
		{"the guest's certificate alone", "must prove it is that workload", nil},
		{"another workload image", csv.ReasonMeasurement, []string{"--workload-evidence", "--workload-csv-sim", other}},
		{"a debuggable workload VM", csv.ReasonDebug, []string{"--workload-evidence", "--workload-csv-sim", debug}},
	} {
		if err := getRandom(proxy(tc.args...)); err == nil {
			t.Errorf("%s reached the bound instance", tc.name)
		}
		if !strings.Contains(topo.Backend.Log.String(), tc.want) {
			t.Errorf("%s: the backend log does not say %q", tc.name, tc.want)
		}
	}
	// The host path works during the boot, the workload locks it.
	mustHostIoctl(t, ctrl, "-l", "0")
	tcti := proxy("--workload-evidence", "--workload-csv-sim", good, "--lock-host")
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_startup", "-c")
	if err := getRandom(tcti); err != nil {
		t.Fatalf("the workload itself: %v\n%s", err, topo.Backend.Log.String())
	}
	if out, err := hostIoctl(ctrl, "-l", "0"); err == nil {
		t.Errorf("the host used the TPM after the workload locked it:\n%s", out)
	}
	mustHostIoctl(t, ctrl, "-i") // a VM reset is still the host's
	mustHostIoctl(t, ctrl, "-l", "0")
}

// A link identity the CA revokes is refused by the backend on its next
// call (the backend checks the CA's CRL, cached for --client-crl-refresh).
func TestRevokedLinkIdentityRefused(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	caDir := filepath.Join(f.Dir, "ca")
	c := startCAProc(t, caDir, f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	bin := testenv.Binary(t, testenv.Cvtpm)
	cert, key := filepath.Join(f.Dir, "id.pem"), filepath.Join(f.Dir, "id.key")
	out := testenv.Run(t, nil, bin, "ca", "identity", "--dir", caDir, "--name", "guest-vm1", "--out-cert", cert, "--out-key", key)
	serial := regexp.MustCompile(`serial ([0-9a-f]+)`).FindStringSubmatch(out)
	if serial == nil {
		t.Fatalf("no serial in %q", out)
	}
	topo := testenv.StartBackend(t, f, "--client-ca", filepath.Join(caDir, "identity-ca.pem"),
		"--client-crl", c.CRLURL(ca.PurposeIdentity), "--client-crl-refresh", "200ms")
	topo.Admin(t, "create", "vm1")
	port := testenv.FreePort(t)
	testenv.StartDaemon(t, "guest proxy", []string{fmt.Sprintf("tcp:127.0.0.1:%d", port)}, "guest", "proxy",
		"--link", topo.LinkAddr, "--instance", "vm1", "--tls-cert", cert, "--tls-key", key, "--policy", f.Policy, "--cert-dir", f.CertDir, "--tcp", fmt.Sprintf("127.0.0.1:%d", port))
	env := []string{fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", port)}
	testenv.RunErr(env, "tpm2_startup", "-c")
	testenv.Run(t, env, "tpm2_getrandom", "8")
	testenv.Run(t, nil, bin, "ca", "revoke", "--dir", caDir, "--reason", "1", serial[1])
	time.Sleep(500 * time.Millisecond)
	if _, err := testenv.RunErr(env, "tpm2_getrandom", "8"); err == nil {
		t.Fatal("a revoked link identity still reaches its instance")
	}
	// The refusal's log line may still be in the stderr pipe.
	if !topo.Backend.Logged("was revoked") {
		t.Errorf("the backend log does not say the identity was revoked:\n%s", topo.Backend.Log)
	}
}
