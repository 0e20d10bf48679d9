package backend

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/vtpm/tpmrpc"
)

// linkFixture is a backend (supervisor, ACL, workload bindings) serving
// the attested link, and a client identity the ACL names "frontend".
type linkFixture struct {
	s       *Supervisor
	addr    string
	aclFile string
	acl     *ACLFile
	client  tls.Certificate
	policy  *csv.AppraisalPolicy
}

func newLinkFixture(t testing.TB, aclJSON string) *linkFixture {
	t.Helper()
	return newLinkFixtureLogging(t, aclJSON, nil)
}

// newLinkFixtureLogging is newLinkFixture with the supervisor's log sent
// to log.
func newLinkFixtureLogging(t testing.TB, aclJSON string, log *slog.Logger) *linkFixture {
	t.Helper()
	sim, err := csv.NewSimulator("SIMBACKEND")
	if err != nil {
		t.Fatal(err)
	}
	measure := [32]byte{0xbe, 0xef}
	sim.SetVM(csv.VMConfig{Version: 1, Measure: measure, Policy: 0x7})
	simDir := t.TempDir()
	sim.Save(simDir)
	policy := &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(simDir, csv.SimRootFile)}, ApprovedMeasurements: []string{hex.EncodeToString(measure[:])}}
	if err := policy.Compile(); err != nil {
		t.Fatal(err)
	}
	// Client CA and the frontend's certificate.
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "link CA"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "frontend"}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	pool := x509.NewCertPool()
	pool.AddCert(ca)

	aclFile := filepath.Join(t.TempDir(), "acl.json")
	os.WriteFile(aclFile, []byte(aclJSON), 0o600)
	acl, err := OpenACLFile(aclFile)
	if err != nil {
		t.Fatal(err)
	}
	s := newSupervisorLogging(t, t.TempDir(), 1, log)
	t.Cleanup(s.Close)
	cert, _ := attestedlink.EphemeralCertificate()
	srv := &attestedlink.Server{TLS: &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool}, Evidence: sim,
		HSKCEK: csv.MarshalHSKCEK(sim.HSK, sim.CEK), Authorizer: &Access{ACL: acl, Bindings: s}, Handler: s}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { srv.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return &linkFixture{s: s, addr: ln.Addr().String(), aclFile: aclFile, acl: acl, client: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, policy: policy}
}

func (f *linkFixture) dial(t *testing.T) *attestedlink.Session {
	t.Helper()
	conn, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := attestedlink.Dial(context.Background(), conn, attestedlink.ClientConfig{Certificate: f.client, Policy: f.policy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sess.Close() })
	return sess
}

func linkCall(t *testing.T, sess *attestedlink.Session, id string, r tpmrpc.Request) tpmrpc.Response {
	t.Helper()
	out, err := sess.Call(context.Background(), id, tpmrpc.AppendRequest(nil, r))
	if err != nil {
		t.Fatalf("link call: %v", err)
	}
	resp, err := tpmrpc.ParseResponse(out)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// Review 2, finding 4 (fixed): the link cached an instance's capabilities for the
// whole session, from the first call naming it. The host's frontend
// (ACL "host" on "*") names an instance id before it exists - there is no
// binding yet, so it is authorised as an unbound instance - and keeps the
// session. The administrator then creates the instance bound to its
// workload with host "none" (or "boot"). The host's old session still has
// the full host role on it: TPM commands, reset, export of its state.
func TestCapabilitiesNotCachedBeforeBinding(t *testing.T) {
	_, root := workloadSim(t, 0x77, 0x7)
	f := newLinkFixture(t, `{"clients": {"frontend": {"instances": ["*"], "capabilities": ["host"]}}}`)
	early := f.dial(t)
	if r := linkCall(t, early, "vm1", tpmrpc.Request{Op: tpmrpc.OpRunning}); r.Err == "" {
		t.Fatalf("vm1 exists already: %+v", r)
	}
	// The administrator creates vm1 bound to its workload, host path closed.
	if _, err := f.s.Create(context.Background(), "vm1", CreateOptions{Binding: bindingJSON(t, root, "none", 0x77)}); err != nil {
		t.Fatal(err)
	}
	// A new host session is refused, as the binding says.
	conn, _ := net.Dial("tcp", f.addr)
	late, err := attestedlink.Dial(context.Background(), conn, attestedlink.ClientConfig{Certificate: f.client, Policy: f.policy})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := late.Call(context.Background(), "vm1", tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpRunning})); err == nil {
		t.Fatal("premise: a new host session reaches vm1 bound with host none")
	} else {
		t.Logf("new host session: %v", err)
	}
	// The early session is refused too: authorisation is asked on every
	// call, not cached from before the binding existed.
	_, err = early.Call(context.Background(), "vm1", tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: startupClear}))
	if err == nil || !strings.Contains(err.Error(), "host path is closed") {
		t.Errorf("the host path of vm1 (bound to its workload, host \"none\") is open to a session authorised before the binding existed: %v", err)
	}
}
