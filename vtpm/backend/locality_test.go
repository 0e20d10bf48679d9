package backend

import (
	"context"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/vtpm/tpmrpc"
)

// A command with an explicit locality (the mssim protocol's, tpmrpc
// ExecuteAtLocality) leaves the TPM at that locality, as set-locality
// does: a caller without locality 4 must not run its next plain command
// at the locality 4 another caller left.
func TestExplicitLocality4DoesNotLeakToOtherCallers(t *testing.T) {
	s := newSupervisor(t, t.TempDir(), 1)
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	priv := s.TPM("vm1", tpmrpc.Roles["host"]|tpmrpc.CapLocality4)
	startup(t, priv)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if rc := responseCode(priv.ExecuteAt(nil, getRandom, 4)); rc != 0 {
		t.Fatalf("GetRandom at locality 4: %#x", rc)
	}
	out, err := s.Call(context.Background(), "vm1", tpmrpc.Roles["guest"], tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: getRandom}), nil)
	if err != nil {
		t.Fatal(err)
	}
	r, err := tpmrpc.ParseResponse(out)
	if err != nil || !strings.Contains(r.Err, "locality 4") {
		t.Fatalf("a guest's plain command after another caller's command at locality 4: %+v, %v", r, err)
	}
}
