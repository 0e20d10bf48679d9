package backend

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/gcm"
	"cvtpm/vtpm/tpmrpc"
)

// The host executes at locality 4 (ExecuteAt: the locality stays set);
// the guest's next direct command is checked at 4, as through the
// supervisor.
func TestReview13bDirectAfterHostExecuteAt4(t *testing.T) {
	f, relay, host := directFixture(t, "guest")
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if rsp := host.ExecuteAt(nil, getRandom, 4); responseCode(rsp) != 0 {
		t.Fatalf("host ExecuteAt 4: %x", rsp)
	}
	resp, err := directExecute(d, getRandom)
	if err != nil || !strings.Contains(resp.Err, "locality 4") {
		t.Fatalf("guest direct command after the host's ExecuteAt(4): %+v %v", resp, err)
	}
	host.ExecuteAt(nil, getRandom, 0)
	resp, err = directExecute(d, getRandom)
	if err != nil || resp.Err != "" {
		t.Fatalf("after ExecuteAt(0): %+v %v", resp, err)
	}
}

// With a key broker cut off, a direct session stops serving as soon as
// the supervisor would (MaxUnanchored 300 ms + a round).
func TestReview13bDirectLeaseWhenBrokerCut(t *testing.T) {
	broker := newFakeBroker(t)
	link := &cuttable{Anchorer: broker.view(t, "a")}
	s := newSupervisorWithAnchorer(t, t.TempDir(), broker, link, "a")
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := s.TPM("vm1", tpmrpc.Roles["host"])
	if rc := host.Init(0); rc != 0 {
		t.Fatalf("init %#x", rc)
	}
	startup(t, host)
	time.Sleep(100 * time.Millisecond)
	h, c := review13bHandoff(t, "vm1", tpmrpc.CapCommand, func() error { return nil })
	if err := s.HandOff(context.Background(), h); err != nil {
		t.Fatal(err)
	}
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if r, err := c.execute(t, getRandom); err != nil || r.Err != "" {
		t.Fatalf("%+v %v", r, err)
	}
	link.cut.Store(true)
	cut := time.Now()
	var lastOK time.Duration
	for time.Since(cut) < 4*time.Second {
		r, err := c.execute(t, getRandom)
		if err != nil {
			break
		}
		if r.Err == "" {
			lastOK = time.Since(cut)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("last direct command %v after the cut", lastOK)
	if lastOK > 700*time.Millisecond {
		t.Errorf("direct session served %v after the broker was cut (MaxUnanchored 300 ms)", lastOK)
	}
}
