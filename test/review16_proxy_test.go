package test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/guestkit"
	"cvtpm/internal/gcm"
	"cvtpm/test/testenv"
)

// Review 16, finding 2 (fixed: the callers refuse to dial after Close, and
// a Proxy takes its TPM only once Connect succeeded). Proxy.TPM is documented "valid after Connect, until Close" and nil when
// not connected. After Close, the transport it handed out keeps working:
// the next command silently attests a new session and asks for a new
// direct session, which the closed Proxy never closes (it holds one of
// the instance's 8 direct-session slots for the agent's lifetime). After a
// Connect that failed, TPM() is not nil either.
func TestReview16ProxyTPMAfterCloseAndFailedConnect(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	relay := topo.StartPlainRelay(t)
	cfg := linkConfig(t, f, "guest-vm1")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// A Connect that fails (nothing listens there).
	bad := &guestkit.Proxy{Link: "tcp:127.0.0.1:1", Instance: "vm1", Direct: gcm.SM4,
		Config: cfg}
	if _, err := bad.Connect(ctx); err == nil {
		t.Fatal("connect to a closed port succeeded")
	}
	if bad.TPM() != nil {
		t.Errorf("after a failed Connect, TPM() hands out a transport (documented: nil when not connected)")
	}

	p := &guestkit.Proxy{Link: relay, Instance: "vm1", Direct: gcm.SM4,
		Config: cfg}
	if _, err := p.Connect(ctx); err != nil {
		t.Fatalf("connecting through the relay: %v", err)
	}
	tpm := p.TPM()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("Startup: %v", err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Fatalf("GetRandom: %v", err)
	}
	handed := func() int {
		return strings.Count(topo.Backend.Log.String(), "direct session handed to the instance's worker")
	}
	// The backend logs a hand-off after it confirmed it to the client,
	// which may already have run its command: wait for the line.
	for deadline := time.Now().Add(5 * time.Second); handed() == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	n := handed()
	if n != 1 {
		t.Fatalf("%d direct sessions handed over for one Proxy, want 1", n)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err == nil {
		t.Errorf("a command on the transport of a closed Proxy succeeded")
	}
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(p.TPM()); err == nil {
		t.Errorf("a command on p.TPM() after Close succeeded")
	}
	time.Sleep(500 * time.Millisecond)
	if m := handed(); m > n {
		t.Errorf("after Close, the backend handed %d new direct session(s) to the worker for the closed Proxy, which nothing will close", m-n)
	}
}
