package testenv

// The backend / frontend / guest proxy topology on one machine: separate
// processes on loopback sockets with the simulated CSV device.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"cvtpm/attest/csv"
)

// Daemon is a cvtpm process started by a test.
type Daemon struct {
	Name string
	Cmd  *exec.Cmd
	Log  *SyncBuffer
	done chan struct{}
}

// SyncBuffer is a log sink goroutines and processes may share.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// StartDaemon runs `cvtpm args...` and waits until every address in
// waitFor ("unix:PATH" or "tcp:HOST:PORT") accepts connections. It is
// stopped with SIGTERM when the test ends.
func StartDaemon(tb testing.TB, name string, waitFor []string, args ...string) *Daemon {
	tb.Helper()
	return StartCommand(tb, name, waitFor, append([]string{Binary(tb, Cvtpm)}, args...)...)
}

// StartLimited is StartDaemon under `prlimit --nofile=N:N`: the process
// has at most nofile descriptors.
func StartLimited(tb testing.TB, nofile int, name string, waitFor []string, args ...string) *Daemon {
	tb.Helper()
	return StartCommand(tb, name, waitFor, append([]string{"prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), Binary(tb, Cvtpm)}, args...)...)
}

// StartCommand is StartDaemon for any command line (argv[0] the program).
func StartCommand(tb testing.TB, name string, waitFor []string, argv ...string) *Daemon {
	tb.Helper()
	d := &Daemon{Name: name, Log: &SyncBuffer{}, done: make(chan struct{})}
	d.Cmd = exec.Command(argv[0], argv[1:]...)
	d.Cmd.Stdout, d.Cmd.Stderr = d.Log, d.Log
	if err := d.Cmd.Start(); err != nil {
		tb.Fatalf("starting %s: %v", name, err)
	}
	go func() { d.Cmd.Wait(); close(d.done) }()
	tb.Cleanup(func() { d.Stop() })
	deadline := time.Now().Add(20 * time.Second)
	for _, a := range waitFor {
		network, addr, _ := strings.Cut(a, ":")
		for {
			select {
			case <-d.done:
				tb.Fatalf("%s exited during start-up: %v\n%s", name, d.Cmd.ProcessState, d.Log)
			default:
			}
			if network == "unix" {
				if fi, err := os.Stat(addr); err == nil && fi.Mode()&os.ModeSocket != 0 {
					break
				}
			} else if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("%s does not listen on %s after 20s\n%s", name, a, d.Log)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return d
}

// Logged waits up to 5 s for the daemon's log to contain want. A line
// the daemon wrote before it answered a call may still be in the pipe
// from its stderr when the caller's test looks.
func (d *Daemon) Logged(want string) bool {
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if strings.Contains(d.Log.String(), want) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// Exited reports whether the process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the process to end.
func (d *Daemon) Wait(timeout time.Duration) bool {
	select {
	case <-d.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// Stop ends the process (SIGTERM, then SIGKILL after 5 s).
func (d *Daemon) Stop() {
	if d.Exited() {
		return
	}
	d.Cmd.Process.Signal(syscall.SIGTERM)
	if !d.Wait(5 * time.Second) {
		d.Cmd.Process.Kill()
		<-d.done
	}
}

// TopologyFiles are the configuration files of a one-machine topology.
type TopologyFiles struct {
	Dir       string
	SimDir    string // CSV simulator (backend --csv-sim)
	CertDir   string // offline HSK+CEK directory with the simulated chip's pair (clients' --cert-dir)
	Sim       *csv.Simulator
	Measure   [32]byte
	Policy    string // client evidence policy trusting the simulator
	ClientCA  string // PEM of the link client CA
	MasterKey string
	ACL       string
	// Identities: "frontend" (all instances) and "guest-vm1" (vm1 only).
	Certs  map[string][2]string // name -> cert, key PEM files
	caKey  *ecdsa.PrivateKey
	caCert *x509.Certificate
}

// NewTopologyFiles writes a simulator whose VM policy is vmPolicy (0x7 =
// NODBG|NOKS|ES, a CSV2 guest), a policy that approves its measurement, a link client CA
// with identities, an ACL and a master key.
func NewTopologyFiles(tb testing.TB, vmPolicy uint32) *TopologyFiles {
	tb.Helper()
	dir := SockDir(tb)
	f := &TopologyFiles{Dir: dir, SimDir: filepath.Join(dir, "csv-sim"), Certs: map[string][2]string{}}
	copy(f.Measure[:], bytes.Repeat([]byte{0x5a}, 32))
	sim, err := csv.NewSimulator("SIMTOPO01")
	if err != nil {
		tb.Fatal(err)
	}
	if err := sim.SetVM(csv.VMConfig{Version: 1, Measure: f.Measure, Policy: vmPolicy}); err != nil {
		tb.Fatal(err)
	}
	if err := sim.Save(f.SimDir); err != nil {
		tb.Fatal(err)
	}
	f.Sim = sim
	f.CertDir = filepath.Join(dir, "kds")
	bundle, err := os.ReadFile(filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	if err != nil {
		tb.Fatal(err)
	}
	os.MkdirAll(filepath.Join(f.CertDir, "hsk_cek", "SIMTOPO01"), 0o700)
	writeFile(tb, filepath.Join(f.CertDir, "hsk_cek", "SIMTOPO01", "hsk_cek.cert"), bundle)
	f.Policy = f.WritePolicy(tb, "policy.json", csv.AppraisalPolicy{
		SimulatorRoots:       []string{filepath.Join(f.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{hex.EncodeToString(f.Measure[:])},
	})
	f.MasterKey = filepath.Join(dir, "master.key")
	key := make([]byte, 32)
	rand.Read(key)
	writeFile(tb, f.MasterKey, []byte(hex.EncodeToString(key)+"\n"))
	f.ACL = filepath.Join(dir, "acl.json")
	writeFile(tb, f.ACL, []byte(`{"clients": {"frontend": {"instances": ["*"], "capabilities": ["host"]}, "guest-vm1": {"instances": ["vm1"], "capabilities": ["guest"]}}}`))

	f.caKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cvtpm test link CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &f.caKey.PublicKey, f.caKey)
	if err != nil {
		tb.Fatal(err)
	}
	f.caCert, _ = x509.ParseCertificate(der)
	f.ClientCA = filepath.Join(dir, "client-ca.pem")
	writeFile(tb, f.ClientCA, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	for _, name := range []string{"frontend", "guest-vm1", "guest-vm2"} {
		f.Certs[name] = f.issue(tb, name)
	}
	return f
}

// WritePolicy writes an evidence policy file and returns its path.
func (f *TopologyFiles) WritePolicy(tb testing.TB, name string, p csv.AppraisalPolicy) string {
	tb.Helper()
	b, err := json.Marshal(p)
	if err != nil {
		tb.Fatal(err)
	}
	path := filepath.Join(f.Dir, name)
	writeFile(tb, path, b)
	return path
}

func (f *TopologyFiles) issue(tb testing.TB, cn string) [2]string {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.caCert, &key.PublicKey, f.caKey)
	if err != nil {
		tb.Fatal(err)
	}
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(key)
	certFile, keyFile := filepath.Join(f.Dir, cn+".pem"), filepath.Join(f.Dir, cn+".key")
	writeFile(tb, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFile(tb, keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8}))
	return [2]string{certFile, keyFile}
}

func writeFile(tb testing.TB, path string, b []byte) {
	if err := os.WriteFile(path, b, 0o600); err != nil {
		tb.Fatal(err)
	}
}

// Topology is a running backend with a frontend relay.
type Topology struct {
	Files     *TopologyFiles
	Backend   *Daemon
	LinkAddr  string // backend link, tcp:...
	AdminSock string
	StateDir  string

	backendArgs []string
}

// StartBackend runs `cvtpm backend` with the simulated CSV device.
func StartBackend(tb testing.TB, f *TopologyFiles, extra ...string) *Topology {
	tb.Helper()
	return StartBackendAt(tb, f, filepath.Join(f.Dir, "state"), extra...)
}

// StartBackendAt runs a backend with its state in stateDir: a second
// backend on the same (simulated) machine.
func StartBackendAt(tb testing.TB, f *TopologyFiles, stateDir string, extra ...string) *Topology {
	tb.Helper()
	port := FreePort(tb)
	t := &Topology{Files: f, LinkAddr: fmt.Sprintf("tcp:127.0.0.1:%d", port), StateDir: stateDir}
	t.AdminSock = filepath.Join(t.StateDir, "admin.sock")
	t.backendArgs = []string{"backend", "--dir", t.StateDir, "--listen", t.LinkAddr, "--client-ca", f.ClientCA, "--acl", f.ACL, "--csv-sim", f.SimDir}
	if !slices.Contains(extra, "--key-broker") { // keys from the broker, or the development key file
		t.backendArgs = append(t.backendArgs, "--master-key-file", f.MasterKey)
	}
	t.backendArgs = append(t.backendArgs, extra...)
	t.Backend = StartDaemon(tb, "backend", []string{t.LinkAddr, "unix:" + t.AdminSock}, t.backendArgs...)
	return t
}

// RestartBackend stops the backend (SIGTERM) and starts it again on the
// same address and state, as after a CVM reboot.
func (t *Topology) RestartBackend(tb testing.TB) {
	tb.Helper()
	t.Backend.Stop()
	t.Backend = StartDaemon(tb, "backend", []string{t.LinkAddr, "unix:" + t.AdminSock}, t.backendArgs...)
}

// RestartBackendLimited restarts the backend with at most nofile
// descriptors (prlimit).
func (t *Topology) RestartBackendLimited(tb testing.TB, nofile int) {
	tb.Helper()
	t.Backend.Stop()
	t.Backend = StartLimited(tb, nofile, "backend", []string{t.LinkAddr, "unix:" + t.AdminSock}, t.backendArgs...)
}

// Admin runs `cvtpm backend VERB --admin SOCK args...` and returns its output.
func (t *Topology) Admin(tb testing.TB, verb string, args ...string) string {
	tb.Helper()
	out, err := RunErr(nil, Binary(tb, Cvtpm), append([]string{"backend", verb, "--admin", t.AdminSock}, args...)...)
	if err != nil {
		tb.Fatalf("cvtpm backend %s: %v\n%s\nbackend log:\n%s", verb, err, out, t.Backend.Log)
	}
	return out
}

// StartRelay runs `cvtpm frontend --relay` in front of the backend,
// capturing every relayed byte to the returned file.
func (t *Topology) StartRelay(tb testing.TB) (addr, capture string) {
	tb.Helper()
	capture = filepath.Join(t.Files.Dir, "relay.capture")
	_, addr = t.startRelay(tb, "--relay-capture", capture)
	return addr, capture
}

// StartPlainRelay runs the relay as in production, without a capture,
// with extra flags (e.g. --relay-join on).
func (t *Topology) StartPlainRelay(tb testing.TB, extra ...string) string {
	tb.Helper()
	_, addr := t.StartRelayDaemon(tb, extra...)
	return addr
}

// StartRelayDaemon is StartPlainRelay that also returns the process.
func (t *Topology) StartRelayDaemon(tb testing.TB, extra ...string) (*Daemon, string) {
	tb.Helper()
	return t.startRelay(tb, extra...)
}

func (t *Topology) startRelay(tb testing.TB, extra ...string) (*Daemon, string) {
	addr := fmt.Sprintf("tcp:127.0.0.1:%d", FreePort(tb))
	d := StartDaemon(tb, "frontend relay", []string{addr}, append([]string{"frontend", "--backend", t.LinkAddr, "--relay", addr}, extra...)...)
	return d, addr
}

// StartGuestProxy runs `cvtpm guest proxy` for instance as identity, over
// link, serving the swtpm protocol on a TCP port pair; it returns the TCTI.
func (t *Topology) StartGuestProxy(tb testing.TB, link, identity, instance, policy string, extra ...string) (*Daemon, string) {
	tb.Helper()
	port := FreePort(tb)
	c := t.Files.Certs[identity]
	args := append([]string{"guest", "proxy", "--link", link, "--instance", instance, "--tls-cert", c[0], "--tls-key", c[1], "--policy", policy,
		"--cert-dir", t.Files.CertDir, "--tcp", fmt.Sprintf("127.0.0.1:%d", port)}, extra...)
	d := StartDaemon(tb, "guest proxy", []string{fmt.Sprintf("tcp:127.0.0.1:%d", port)}, args...)
	return d, fmt.Sprintf("swtpm:host=127.0.0.1,port=%d", port)
}
