package tpmrpc

import (
	"bytes"
	"encoding/binary"
	"slices"
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

func TestDirectSyncReply(t *testing.T) {
	long := string(bytes.Repeat([]byte{'x'}, 300))
	for _, c := range []struct {
		name string
		in   DirectSyncReply
		want DirectSyncReply
	}{
		{"nothing open", DirectSyncReply{}, DirectSyncReply{}},
		{"open sessions only", DirectSyncReply{Open: []uint64{4, 7}}, DirectSyncReply{Open: []uint64{4, 7}}},
		{"calls answered", DirectSyncReply{Calls: 12, Busy: 340 * time.Microsecond, Open: []uint64{4}}, DirectSyncReply{Calls: 12, Busy: 340 * time.Microsecond, Open: []uint64{4}}},
		{"a refusal on a session that ended", DirectSyncReply{Open: []uint64{4}, Refusals: []DirectRefusal{{Session: 5, Calls: 2, Reason: "refused: locality 4"}}},
			DirectSyncReply{Open: []uint64{4}, Refusals: []DirectRefusal{{Session: 5, Calls: 2, Reason: "refused: locality 4"}}}},
		{"a reason longer than 255 bytes is cut", DirectSyncReply{Refusals: []DirectRefusal{{Session: 1, Calls: 1, Reason: long}}},
			DirectSyncReply{Refusals: []DirectRefusal{{Session: 1, Calls: 1, Reason: long[:255]}}}},
	} {
		b := AppendDirectSyncReply(nil, c.in)
		got, err := ParseDirectSyncReply(b)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got.Calls != c.want.Calls || got.Busy != c.want.Busy || !slices.Equal(got.Open, c.want.Open) || !slices.Equal(got.Refusals, c.want.Refusals) {
			t.Errorf("%s: round trip %+v, want %+v", c.name, got, c.want)
		}
		for n := range len(b) {
			if _, err := ParseDirectSyncReply(b[:n]); err == nil && n < len(b) && (n < 14+8*len(c.in.Open) || len(c.in.Refusals) > 0 && n > 14+8*len(c.in.Open)) {
				t.Errorf("%s: a reply cut to %d of %d bytes parsed", c.name, n, len(b))
			}
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
	f.Add(AppendDirectSyncReply(nil, DirectSyncReply{Open: []uint64{1}, Refusals: []DirectRefusal{{Session: 2, Calls: 3, Reason: "refused"}}}))
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
		if r, err := ParseDirectSyncReply(b); err == nil && b[4]&0x80 == 0 {
			if !bytes.Equal(AppendDirectSyncReply(nil, r), b) {
				t.Fatalf("sync reply %x re-encodes differently", b)
			}
		}
	})
}
