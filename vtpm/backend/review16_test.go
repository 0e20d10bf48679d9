package backend

import (
	"bytes"
	"context"
	"encoding/binary"
	"log/slog"
	"math"
	"net"
	"slices"
	"testing"
	"time"

	"cvtpm/vtpm/tpmrpc"
)

// review16FakeWorker stands for a compromised worker (code execution in
// libtpms): it answers every call of the supervisor with reply.
func review16FakeWorker(t *testing.T, reply []byte) *worker {
	t.Helper()
	sup, evil := net.Pipe()
	t.Cleanup(func() { sup.Close(); evil.Close() })
	go func() {
		for {
			if _, err := tpmrpc.ReadMessage(evil, nil); err != nil {
				return
			}
			out := binary.BigEndian.AppendUint32(nil, uint32(len(reply)))
			if _, err := evil.Write(append(out, reply...)); err != nil {
				return
			}
		}
	}()
	return &worker{conn: nil, caller: tpmrpc.NewConnCaller(sup), done: make(chan struct{}), hung: time.NewTimer(time.Hour)}
}

// Review 16, finding 1 (fixed: at most MaxDirectSyncSessions entries in
// a reply; only sessions handed to this instance, once each, at most
// maxRefusalsPerSync calls each). A compromised worker answered OpDirectSync with a reply of MaxMessage
// bytes: its own session 1 open, and ~80,000 "refusals", each of
// 2^32-1 calls, on sessions it was never given. The supervisor adds them
// all to cvtpm_backend_calls_refused_total{op="execute"}, a counter
// shared by every instance (no instance label): +3.5e14 per sync, once a
// second. After ~55 syncs the counter is past 2^54, where a float64 no
// longer holds +1: a refusal of another instance's caller no longer shows
// in the exported value (and after ~15 h the uint64 behind it wraps,
// which Prometheus reads as a counter reset).
func TestReview16CompromisedWorkerInflatesSharedRefusalCounter(t *testing.T) {
	s := newSupervisorLogging(t, t.TempDir(), 1, slog.New(slog.DiscardHandler))
	defer s.Close()
	if _, err := s.Create(context.Background(), "other", CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// The reply as the review wrote it: ~80,000 entries. Refused whole now.
	lying := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint32(nil, ^uint32(0)), math.MaxInt64) // calls, busy
	huge := binary.BigEndian.AppendUint16(slices.Clone(lying), 1)
	huge = binary.BigEndian.AppendUint64(huge, 1)
	for len(huge)+13 <= tpmrpc.MaxMessage-tpmrpc.ResponseHeaderSize {
		huge = binary.BigEndian.AppendUint64(huge, uint64(len(huge)))
		huge = binary.BigEndian.AppendUint32(huge, ^uint32(0))
		huge = append(huge, 0)
	}
	if _, err := tpmrpc.ParseDirectSyncReply(huge); err == nil {
		t.Error("a sync reply with ~80,000 refusal entries parsed")
	}
	// The worst a reply within bounds can do: its own session 1 with
	// 2^32-1 refusals, then the same session again and sessions it was
	// never given, each with 2^32-1.
	payload := binary.BigEndian.AppendUint16(slices.Clone(lying), 1)
	payload = binary.BigEndian.AppendUint64(payload, 1) // its one real session stays open
	entries := 0
	for entries < tpmrpc.MaxDirectSyncSessions {
		id := uint64(1000 + entries) // never handed to it
		if entries < 2 {
			id = 1
		}
		payload = binary.BigEndian.AppendUint64(payload, id)
		payload = binary.BigEndian.AppendUint32(payload, ^uint32(0))
		payload = append(payload, 0) // empty reason
		entries++
	}
	if _, err := tpmrpc.ParseDirectSyncReply(payload); err != nil {
		t.Fatal(err)
	}
	reply := tpmrpc.AppendResponse(nil, tpmrpc.Response{Payload: payload})
	w := review16FakeWorker(t, reply)
	inst := &instance{id: "evil", w: w}
	inst.direct = []*directSession{{id: 1, w: w, client: "guest-evil"}}
	directSessions.Inc()

	before := refusedExecutes(t)
	callsBefore, secondsBefore := counterValue(t, directCalls), counterValue(t, directCallSeconds)
	s.endDirect(context.Background(), inst, nil) // one round of the direct loop
	added := refusedExecutes(t) - before
	// The calls and time it claims to have answered are bounded too.
	if n := counterValue(t, directCalls) - callsBefore; n > maxDirectCallsPerSync {
		t.Errorf("one sync counted %v direct calls", n)
	}
	if d := counterValue(t, directCallSeconds) - secondsBefore; d > maxDirectBusyPerSync.Seconds() {
		t.Errorf("one sync counted %v s of direct calls", d)
	}
	t.Logf("one sync of a worker lying about its refusals added %.4g to the shared counter (%d entries)", added, entries)
	if added > maxRefusalsPerSync {
		t.Errorf("one sync counted +%.4g refusals: more than %d for its one session", added, maxRefusalsPerSync)
	}

	for range 60 { // a minute of the direct loop
		s.endDirect(context.Background(), inst, nil)
	}
	if len(inst.direct) != 1 {
		t.Fatalf("the fake worker's session was dropped: %d", len(inst.direct))
	}
	// Another instance's caller is refused once, by the supervisor itself.
	mid := refusedExecutes(t)
	r := call(t, s, "other", tpmrpc.Roles["guest"], tpmrpc.Request{Op: tpmrpc.OpExecute, Locality: 4, Arg: tpmrpc.ExecuteAtLocality,
		Payload: []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}})
	if r.Err == "" || !bytes.Contains([]byte(r.Err), []byte("refused")) {
		t.Fatalf("the other instance's locality-4 command was not refused: %+v", r)
	}
	if d := refusedExecutes(t) - mid; d != 1 {
		t.Errorf("after a minute of the compromised worker's syncs (counter %.6g), another instance's refusal shows as %+v, want +1", mid, d)
	}
}
