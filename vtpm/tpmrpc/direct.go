package tpmrpc

import (
	"encoding/binary"
	"fmt"
	"math"
	"time"

	"cvtpm/internal/directlink"
)

// DirectGrant is what the supervisor tells a worker of a direct session
// it hands over (OpDirectAttach): what the session's client may do, how
// long the worker may serve before the supervisor renews that, and the
// session's keys. The keys never cross any socket but the worker's own.
type DirectGrant struct {
	Caps Capabilities
	// Lease is how long from now the worker may serve direct calls
	// (LeaseUnbounded: the backend has no key broker to keep up with).
	Lease time.Duration
	Keys  directlink.Keys
}

// LeaseUnbounded is the lease of a backend without a key broker.
const LeaseUnbounded = time.Duration(math.MaxInt64)

// AppendDirectGrant appends g's encoding: caps u32 | lease ns i64 |
// cipher len u8 + name | key len u8 + client-to-server | key len u8 +
// server-to-client.
func AppendDirectGrant(dst []byte, g DirectGrant) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(g.Caps))
	dst = binary.BigEndian.AppendUint64(dst, uint64(max(g.Lease, 0)))
	for _, b := range [][]byte{[]byte(g.Keys.Cipher), g.Keys.ClientToServer, g.Keys.ServerToClient} {
		dst = append(dst, byte(len(b)))
		dst = append(dst, b...)
	}
	return dst
}

// ParseDirectGrant decodes a grant; the keys are copies.
func ParseDirectGrant(b []byte) (DirectGrant, error) {
	if len(b) < 12 {
		return DirectGrant{}, fmt.Errorf("%w: direct grant is %d bytes", ErrMalformed, len(b))
	}
	g := DirectGrant{Caps: Capabilities(binary.BigEndian.Uint32(b)), Lease: time.Duration(binary.BigEndian.Uint64(b[4:]) & math.MaxInt64)}
	b = b[12:]
	var parts [3][]byte
	for i := range parts {
		if len(b) < 1 || len(b) < 1+int(b[0]) {
			return DirectGrant{}, fmt.Errorf("%w: direct grant truncated", ErrMalformed)
		}
		parts[i] = append([]byte(nil), b[1:1+int(b[0])]...)
		b = b[1+int(b[0]):]
	}
	if len(b) != 0 {
		return DirectGrant{}, fmt.Errorf("%w: %d stray bytes after the direct grant", ErrMalformed, len(b))
	}
	g.Keys = directlink.Keys{Cipher: string(parts[0]), ClientToServer: parts[1], ServerToClient: parts[2]}
	return g, nil
}

// AppendDirectSync appends an OpDirectSync payload: lease ns i64, then
// the ids of the sessions to end (u64 each).
func AppendDirectSync(dst []byte, lease time.Duration, end []uint64) []byte {
	dst = binary.BigEndian.AppendUint64(dst, uint64(max(lease, 0)))
	return AppendSessionIDs(dst, end)
}

// ParseDirectSync decodes an OpDirectSync payload.
func ParseDirectSync(b []byte) (time.Duration, []uint64, error) {
	if len(b) < 8 {
		return 0, nil, fmt.Errorf("%w: direct sync is %d bytes", ErrMalformed, len(b))
	}
	ids, err := ParseSessionIDs(b[8:])
	return time.Duration(binary.BigEndian.Uint64(b) & math.MaxInt64), ids, err
}

// DirectRefusal counts the calls a worker refused on one direct session
// since its last OpDirectSync: the supervisor, which never sees them,
// counts and logs them as it does its own refusals.
type DirectRefusal struct {
	Session uint64
	Calls   uint32
	Reason  string // why the last of them was refused
}

// DirectSyncReply is a worker's answer to OpDirectSync: what it answered
// on its direct sessions since the last one, the sessions it still holds,
// and what it refused since the last one (sessions that ended meanwhile
// included).
type DirectSyncReply struct {
	// Calls is how many calls the worker answered on direct sessions, and
	// Busy the time it spent on them (a whole record received to its
	// answer written): the supervisor, which does not see them, exports
	// both.
	Calls    uint32
	Busy     time.Duration
	Open     []uint64
	Refusals []DirectRefusal
}

// maxRefusalReason bounds a reason on the wire (a u8 length).
const maxRefusalReason = 255

// MaxDirectSyncSessions bounds the sessions a sync reply may name, open
// or with refusals: a worker holds at most a few (the supervisor hands an
// instance's worker at most 8 before a sync prunes them), and a reply
// naming more is not a worker's honest answer.
const MaxDirectSyncSessions = 64

// AppendDirectSyncReply appends r's encoding: calls u32 | busy ns u64 |
// open count u16 | ids u64 each | then, per refusal, session u64 | calls
// u32 | reason len u8 + reason (cut to 255 bytes).
func AppendDirectSyncReply(dst []byte, r DirectSyncReply) []byte {
	dst = binary.BigEndian.AppendUint32(dst, r.Calls)
	dst = binary.BigEndian.AppendUint64(dst, uint64(max(r.Busy, 0)))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(r.Open)))
	dst = AppendSessionIDs(dst, r.Open)
	for _, f := range r.Refusals {
		dst = binary.BigEndian.AppendUint64(dst, f.Session)
		dst = binary.BigEndian.AppendUint32(dst, f.Calls)
		reason := f.Reason[:min(len(f.Reason), maxRefusalReason)]
		dst = append(dst, byte(len(reason)))
		dst = append(dst, reason...)
	}
	return dst
}

// ParseDirectSyncReply decodes a worker's answer to OpDirectSync.
func ParseDirectSyncReply(b []byte) (DirectSyncReply, error) {
	if len(b) < 14 {
		return DirectSyncReply{}, fmt.Errorf("%w: direct sync reply is %d bytes", ErrMalformed, len(b))
	}
	calls, busy := binary.BigEndian.Uint32(b), time.Duration(binary.BigEndian.Uint64(b[4:])&math.MaxInt64)
	b = b[12:]
	n := int(binary.BigEndian.Uint16(b))
	if n > MaxDirectSyncSessions {
		return DirectSyncReply{}, fmt.Errorf("%w: direct sync reply names %d open sessions, more than %d", ErrMalformed, n, MaxDirectSyncSessions)
	}
	if len(b) < 2+8*n {
		return DirectSyncReply{}, fmt.Errorf("%w: direct sync reply names %d open sessions in %d bytes", ErrMalformed, n, len(b)-2)
	}
	open, _ := ParseSessionIDs(b[2 : 2+8*n])
	r := DirectSyncReply{Calls: calls, Busy: busy, Open: open}
	for b = b[2+8*n:]; len(b) > 0; {
		if len(r.Refusals) == MaxDirectSyncSessions {
			return DirectSyncReply{}, fmt.Errorf("%w: direct sync reply has more than %d refusal entries", ErrMalformed, MaxDirectSyncSessions)
		}
		if len(b) < 13 || len(b) < 13+int(b[12]) {
			return DirectSyncReply{}, fmt.Errorf("%w: direct sync reply: refusal %d truncated", ErrMalformed, len(r.Refusals))
		}
		r.Refusals = append(r.Refusals, DirectRefusal{
			Session: binary.BigEndian.Uint64(b),
			Calls:   binary.BigEndian.Uint32(b[8:]),
			Reason:  string(b[13 : 13+int(b[12])]),
		})
		b = b[13+int(b[12]):]
	}
	return r, nil
}

// AppendSessionIDs appends ids, u64 each.
func AppendSessionIDs(dst []byte, ids []uint64) []byte {
	for _, id := range ids {
		dst = binary.BigEndian.AppendUint64(dst, id)
	}
	return dst
}

// ParseSessionIDs decodes a list of session ids.
func ParseSessionIDs(b []byte) ([]uint64, error) {
	if len(b)%8 != 0 {
		return nil, fmt.Errorf("%w: session id list of %d bytes", ErrMalformed, len(b))
	}
	ids := make([]uint64, 0, len(b)/8)
	for ; len(b) > 0; b = b[8:] {
		ids = append(ids, binary.BigEndian.Uint64(b))
	}
	return ids, nil
}

// TPM command codes that a direct session does not carry: the backend's
// supervisor answers or follows them (restart replay of TPM2_Startup,
// the CSV report vendor command, the command list it amends), so clients
// send them through it.
const (
	ccStartup       = 0x144
	ccGetCapability = 0x17a
	ccVendorBit     = 1 << 29
)

// DirectEligible returns nil if r may go through a direct session (a
// plain Execute of an ordinary TPM command), or why not. The client
// routes by it and the worker refuses by it.
func DirectEligible(r Request) error {
	if r.Op != OpExecute || r.Arg != 0 {
		return fmt.Errorf("%v does not go through a direct session", r.Op)
	}
	if len(r.Payload) >= 10 {
		if cc := binary.BigEndian.Uint32(r.Payload[6:10]); cc == ccStartup || cc == ccGetCapability || cc&ccVendorBit != 0 {
			return fmt.Errorf("TPM command %#x does not go through a direct session", cc)
		}
	}
	return nil
}
