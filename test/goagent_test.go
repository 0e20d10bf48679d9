package test

import (
	"bytes"
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/guestkit"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/gcm"
	"cvtpm/test/testenv"
)

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
	c := f.Certs["guest-vm1"]
	cert, err := tls.LoadX509KeyPair(c[0], c[1])
	if err != nil {
		t.Fatal(err)
	}
	policy, err := csv.LoadAppraisalPolicy(f.Policy)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p := &guestkit.Proxy{Link: relay, Instance: "vm1", Direct: gcm.SM4,
		Config: attestedlink.ClientConfig{Certificate: cert, Policy: policy}}
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
