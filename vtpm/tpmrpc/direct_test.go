package tpmrpc

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"cvtpm/internal/directlink"
)

func command(cc uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte{0x80, 0x01, 0, 0, 0, 12}, cc)
}

func TestDirectEligible(t *testing.T) {
	for _, c := range []struct {
		name string
		r    Request
		ok   bool
	}{
		{"GetRandom", Request{Op: OpExecute, Payload: command(0x17b)}, true},
		{"PCR_Extend", Request{Op: OpExecute, Payload: command(0x182)}, true},
		{"a command too short to have a code", Request{Op: OpExecute, Payload: []byte{0x80}}, true},
		{"Startup: replayed by the supervisor", Request{Op: OpExecute, Payload: command(ccStartup)}, false},
		{"GetCapability: amended by the supervisor", Request{Op: OpExecute, Payload: command(ccGetCapability)}, false},
		{"a vendor command (the CSV report)", Request{Op: OpExecute, Payload: command(0x20000000 | 0x1)}, false},
		{"an explicit locality", Request{Op: OpExecute, Arg: ExecuteAtLocality, Payload: command(0x17b)}, false},
		{"init", Request{Op: OpInit}, false},
		{"set-locality", Request{Op: OpSetLocality}, false},
		{"get-state", Request{Op: OpGetState}, false},
		{"direct-attach", Request{Op: OpDirectAttach}, false},
	} {
		if err := DirectEligible(c.r); (err == nil) != c.ok {
			t.Errorf("%s: DirectEligible = %v, want eligible %v", c.name, err, c.ok)
		}
	}
}

func TestDirectOpsNeedACapabilityNobodyHas(t *testing.T) {
	all := capEnd - 1
	for _, op := range []Op{OpDirectAttach, OpDirectSync} {
		if err := all.Allow(Request{Op: op}); err == nil {
			t.Errorf("%v is allowed to a link caller with every capability", op)
		}
	}
}

func TestDirectGrantRoundTrip(t *testing.T) {
	g := DirectGrant{Caps: CapCommand | CapLock, Lease: 1500 * time.Millisecond,
		Keys: directlink.Keys{Cipher: "sm4-gcm", ClientToServer: bytes.Repeat([]byte{1}, 16), ServerToClient: bytes.Repeat([]byte{2}, 16)}}
	b := AppendDirectGrant(nil, g)
	got, err := ParseDirectGrant(b)
	if err != nil {
		t.Fatal(err)
	}
	if got.Caps != g.Caps || got.Lease != g.Lease || got.Keys.Cipher != g.Keys.Cipher ||
		!bytes.Equal(got.Keys.ClientToServer, g.Keys.ClientToServer) || !bytes.Equal(got.Keys.ServerToClient, g.Keys.ServerToClient) {
		t.Fatalf("round trip: %+v, want %+v", got, g)
	}
	for n := range len(b) {
		if _, err := ParseDirectGrant(b[:n]); err == nil {
			t.Fatalf("a grant cut to %d of %d bytes parsed", n, len(b))
		}
	}
	if _, err := ParseDirectGrant(append(b, 0)); err == nil {
		t.Fatal("a grant with a stray byte parsed")
	}
	lease, ids, err := ParseDirectSync(AppendDirectSync(nil, LeaseUnbounded, []uint64{3, 9}))
	if err != nil || lease != LeaseUnbounded || len(ids) != 2 || ids[1] != 9 {
		t.Fatalf("sync round trip: %v %v %v", lease, ids, err)
	}
}

// FuzzParseDirect: the grant and sync decoders never panic, and what
// they accept encodes back to the same bytes.
func FuzzParseDirect(f *testing.F) {
	f.Add(AppendDirectGrant(nil, DirectGrant{Caps: CapCommand, Lease: time.Second, Keys: directlink.Keys{Cipher: "aes-256-gcm", ClientToServer: make([]byte, 32), ServerToClient: make([]byte, 32)}}))
	f.Add(AppendDirectSync(nil, time.Second, []uint64{1, 2}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if g, err := ParseDirectGrant(b); err == nil {
			if len(b) >= 12 && b[4]&0x80 == 0 && !bytes.Equal(AppendDirectGrant(nil, g), b) {
				t.Fatalf("grant %x re-encodes differently", b)
			}
		}
		if lease, ids, err := ParseDirectSync(b); err == nil && b[0]&0x80 == 0 {
			if !bytes.Equal(AppendDirectSync(nil, lease, ids), b) {
				t.Fatalf("sync %x re-encodes differently", b)
			}
		}
	})
}
