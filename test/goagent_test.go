package test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/guestkit"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/gcm"
	"cvtpm/test/testenv"
)

// linkConfig is the attested link's client configuration of identity
// (a certificate the topology's client CA issued) with its policy.
func linkConfig(t *testing.T, f *testenv.TopologyFiles, identity string) attestedlink.ClientConfig {
	t.Helper()
	c := f.Certs[identity]
	cert, err := tls.LoadX509KeyPair(c[0], c[1])
	if err != nil {
		t.Fatal(err)
	}
	policy, err := csv.LoadAppraisalPolicy(f.Policy)
	if err != nil {
		t.Fatal(err)
	}
	return attestedlink.ClientConfig{Certificate: cert, Policy: policy}
}

// A Go agent in the guest uses its vTPM with the attested link in its
// own process (guestkit.Proxy.TPM), through the host's relay and a
// direct session with the instance's worker, no guest proxy process in
// between: go-attestation reads the EK, creates an AK and quotes, and
// the quote verifies against the PCRs it read.
func TestGoAgentWithTheLinkInProcess(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	relay := topo.StartPlainRelay(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := &guestkit.Proxy{Link: relay, Instance: "vm1", Direct: gcm.SM4, Config: linkConfig(t, f, "guest-vm1")}
	if p.TPM() != nil {
		t.Fatal("a proxy that has not connected hands out a TPM")
	}
	if _, err := p.Connect(ctx); err != nil {
		t.Fatalf("connecting through the relay: %v", err)
	}
	defer p.Close()
	tpm := p.TPM()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	at, err := guestkit.OpenAttestTPM(tpm)
	if err != nil {
		t.Fatalf("go-attestation on the in-process link: %v", err)
	}
	defer at.Close()
	if eks, err := at.EKs(); err != nil || len(eks) == 0 {
		t.Fatalf("EKs: %v, %d", err, len(eks))
	}
	ak, err := at.NewAK(&attest.AKConfig{Algorithm: attest.ECDSA})
	if err != nil {
		t.Fatalf("NewAK: %v", err)
	}
	defer ak.Close(at)
	nonce := bytes.Repeat([]byte{0x42}, 32)
	quote, err := ak.Quote(at, nonce, attest.HashSHA256)
	if err != nil {
		t.Fatalf("Quote: %v", err)
	}
	pcrs, err := at.PCRs(attest.HashSHA256)
	if err != nil {
		t.Fatalf("PCRs: %v", err)
	}
	pub, err := attest.ParseAKPublic(ak.AttestationParameters().Public)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Verify(*quote, pcrs, nonce); err != nil {
		t.Fatalf("the quote does not verify against the PCRs read: %v", err)
	}
	// The commands took a direct session with the worker (SM4-GCM
	// records), not the supervisor.
	if !topo.Backend.Logged("direct session handed to the instance's worker") {
		t.Fatalf("no direct session was handed over; backend log:\n%s", topo.Backend.Log)
	}
}

// `cvtpm guest attest --link` needs no guest proxy: it attests the backend
// through the relay itself, gathers the evidence over the link (a direct
// session with the worker) and gets a verdict from a `cvtpm verifier`
// process: affirming for the vTPM's quote and event log. The same command with --tpm and --link is
// refused before anything is touched.
func TestGuestAttestOverTheLink(t *testing.T) {
	e := startAttestEnv(t, "vm1") // vm1 enrolled; its "boot" measured into PCR 16
	relay := e.topo.StartPlainRelay(t)
	addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	key := filepath.Join(e.files.Dir, "verifier.key")
	testenv.StartDaemon(t, "verifier", []string{"tcp:" + addr}, "verifier",
		"--ek-root", e.ca.RootFile(ca.PurposeEK), "--ak-root", e.ca.RootFile(ca.PurposeAK),
		"--crl", e.ca.CRLURL(ca.PurposeEK), "--crl", e.ca.CRLURL(ca.PurposeAK), "--policy", e.files.Policy,
		"--cert-dir", e.files.CertDir, "--token-key", key, "--listen", addr, "--http", "")
	events := filepath.Join(t.TempDir(), "events.log")
	if err := os.WriteFile(events, e.logs["vm1"].bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	c := e.files.Certs["guest-vm1"]
	args := []string{"guest", "attest", "--link", relay, "--instance", "vm1", "--tls-cert", c[0], "--tls-key", c[1],
		"--policy", e.files.Policy, "--cert-dir", e.files.CertDir, "--direct", gcm.SM4,
		"--ca", e.ca.Addr, "--ca-fingerprint", e.ca.Fingerprint, "--verifier", addr,
		"--event-log", events, "--verifier-key", key + ".pub.pem", "--json"}
	out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), args...)
	if err != nil {
		t.Fatalf("guest attest --link: %v\n%s", err, out)
	}
	var verdict struct {
		Submods map[string]struct {
			Status string `json:"ear.status"`
		} `json:"submods"`
	}
	if i := strings.Index(out, "{"); i < 0 || json.Unmarshal([]byte(out[i:strings.LastIndex(out, "}")+1]), &verdict) != nil {
		t.Fatalf("no verdict in the output:\n%s", out)
	}
	// Affirming for the vTPM; a warning for the backend's CSV leg only
	// because its evidence is simulated.
	if verdict.Submods["cvtpm-vtpm"].Status != "affirming" || verdict.Submods["csv-platform"].Status != "warning" {
		t.Fatalf("verdict: %+v\n%s", verdict.Submods, out)
	}
	if !e.topo.Backend.Logged("direct session handed to the instance's worker") || !strings.Contains(e.topo.Backend.Log.String(), "client=guest-vm1") {
		t.Fatalf("guest attest's commands took no direct session as guest-vm1; backend log:\n%s", e.topo.Backend.Log)
	}
	bad := append(slices.Clone(args), "--tpm", "/dev/tpmrm0")
	if out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), bad...); err == nil || !strings.Contains(out, "not both") {
		t.Fatalf("--tpm with --link: %v\n%s", err, out)
	}
}
