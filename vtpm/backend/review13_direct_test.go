package backend

import (
	"context"
	"net"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/attestedlink"
	"cvtpm/internal/directlink"
	"cvtpm/internal/gcm"
	"cvtpm/vtpm/tpmrpc"
)

// unexportedField reads field name of *v (a struct pointer) whatever its
// export status: the review's client needs the direct session's socket and
// keys to pipeline records, which a malicious client simply has.
func unexportedField[T any](v any, name string) T {
	f := reflect.ValueOf(v).Elem().FieldByName(name)
	return reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Interface().(T)
}

// pipeliner is a malicious direct-session client: it keeps sending sealed
// commands without waiting for their answers, and reads the answers as
// fast as they come.
type pipeliner struct {
	raw      net.Conn
	seal     *directlink.Sealer
	open     *directlink.Opener
	ok       atomic.Int64
	lastOK   atomic.Int64 // unix nanos of the last command that ran
	stopOnce sync.Once
	done     chan struct{}
	endErr   error
}

func startPipeliner(t *testing.T, d *attestedlink.DirectSession, cmd []byte) *pipeliner {
	t.Helper()
	p := &pipeliner{
		raw:  unexportedField[net.Conn](d, "raw"),
		seal: unexportedField[*directlink.Sealer](d, "seal"),
		open: unexportedField[*directlink.Opener](d, "open"),
		done: make(chan struct{}),
	}
	req := tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: cmd})
	go func() { // writer
		var batch []byte
		for {
			batch = batch[:0]
			for range 256 {
				var err error
				if batch, err = p.seal.Seal(batch, req); err != nil {
					return
				}
			}
			if _, err := p.raw.Write(batch); err != nil {
				return
			}
		}
	}()
	go func() { // reader
		defer close(p.done)
		var buf []byte
		for {
			rec, err := directlink.ReadRecord(p.raw, buf)
			if err != nil {
				p.endErr = err
				return
			}
			buf = rec[:0]
			msg, err := p.open.Open(rec)
			if err != nil {
				p.endErr = err
				return
			}
			resp, err := tpmrpc.ParseResponse(msg)
			if err == nil && resp.Err == "" && len(resp.Payload) >= 10 && resp.Payload[9] == 0 && resp.Payload[8] == 0 {
				p.ok.Add(1)
				p.lastOK.Store(time.Now().UnixNano())
			}
		}
	}()
	t.Cleanup(p.stop)
	return p
}

func (p *pipeliner) stop() {
	p.stopOnce.Do(func() { p.raw.Close(); <-p.done })
}

// A client whose access is revoked must lose its direct session within
// the supervisor's next round (directSyncInterval, as
// TestDirectSessionEndsWhenAccessIsRevoked checks for a client that sends
// one command at a time). The worker's serveDirect reads a session until
// EAGAIN before it looks at the supervisor's socket again, so a client
// that keeps its socket non-empty (pipelines) holds the worker: the
// supervisor's OpDirectSync that would end the session waits (under the
// instance's lock, on a blocking socket) until CallTimeout (2 minutes by
// default) kills the worker. Until then the revoked client runs commands
// and every supervisor call to the instance (the host's too) waits.
func TestReviewDirectPipelinedClientOutlivesRevocation(t *testing.T) {
	f, _, host := directFixture(t, "guest")
	d := openDirect(t, f, f.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if _, err := directExecute(d, getRandom); err != nil {
		t.Fatal(err)
	}
	p := startPipeliner(t, d, getRandom)
	time.Sleep(300 * time.Millisecond)
	if p.ok.Load() == 0 {
		t.Fatalf("the pipelining client got no answers: %v", p.endErr)
	}

	// The host asks the supervisor for something while the client streams.
	hostDone := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		host.Execute(nil, getRandom)
		hostDone <- time.Since(start)
	}()

	if err := os.WriteFile(f.aclFile, []byte(`{"clients": {"frontend": {"instances": ["vm2"], "capabilities": ["guest"]}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := f.acl.Reload(); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	const watch = 6 * time.Second
	select {
	case <-p.done:
	case <-time.After(watch):
	}
	last := time.Unix(0, p.lastOK.Load())
	var hostWait time.Duration
	select {
	case hostWait = <-hostDone:
	default:
		hostWait = -1
	}
	p.stop()
	after := last.Sub(revoked)
	t.Logf("commands run: %d; last one %v after the revocation; session end: %v; host call through the supervisor: %v (-1: still waiting)", p.ok.Load(), after.Round(time.Millisecond), p.endErr, hostWait)
	if after > 3*directSyncInterval {
		t.Errorf("a revoked client kept running TPM commands on its direct session %v after the ACL dropped it (want < %v)", after.Round(time.Millisecond), 3*directSyncInterval)
	}
	if hostWait < 0 || hostWait > 3*time.Second {
		t.Errorf("the host's call through the supervisor waited %v (-1: still waiting after %v) behind one guest's direct session", hostWait, watch)
	}
}

// A guest with commands only ("guest": no CapReset, which exists so that
// "a guest user who could reset [the PCRs] could replay a boot it never
// had") resets the TPM: its pipelining direct session holds the worker
// until the supervisor's hung-worker timer (CallTimeout) kills it, and the
// restarted worker's TPM has its PCRs back at zero (restore replays
// init + startup). Shown with CallTimeout cut to 2 s; the default 2 min
// only makes it slower.
func TestReviewDirectGuestWithoutResetResetsPCRs(t *testing.T) {
	f, _, host := directFixture(t, "guest")
	f.s.cfg.CallTimeout = 2 * time.Second
	extend := marshalCommand(t, tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(10), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}}})
	readPCR := func() []byte {
		rsp, err := (tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
			{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(10)}}}}).Execute(host)
		if err != nil || len(rsp.PCRValues.Digests) != 1 {
			t.Fatalf("PCR_Read: %v", err)
		}
		return rsp.PCRValues.Digests[0].Buffer
	}
	d := openDirect(t, f, f.addr, gcm.AES256)
	resp, err := directExecute(d, extend)
	if err != nil || responseRC(t, resp) != 0 {
		t.Fatalf("PCR_Extend: %+v %v", resp, err)
	}
	before := readPCR()
	if allZero(before) {
		t.Fatal("PCR 10 not extended")
	}
	// Streams harmless GetRandoms; the supervisor's next round (or any
	// call) then waits on the worker.
	p := startPipeliner(t, d, marshalCommand(t, tpm2.GetRandom{BytesRequested: 8}))
	select {
	case <-p.done:
	case <-time.After(8 * time.Second):
	}
	p.stop()
	after := readPCR()
	inst := f.s.lookup("vm1")
	inst.mu.Lock()
	restarts := inst.restarts
	inst.mu.Unlock()
	t.Logf("PCR 10 before %x, after %x; worker restarts %d; session end: %v", before[:8], after[:8], restarts, p.endErr)
	if allZero(after) {
		t.Errorf("a guest without the reset capability reset the TPM (PCR 10 is zero again, %d worker restart(s)) by holding the worker with a pipelining direct session", restarts)
	}
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// directLoop waits for every instance's syncDirect before its next round
// (wg.Wait), so one instance whose worker is held (a pipelining client,
// or any worker slow to answer) stops revocation, and lease renewal, for
// the direct sessions of every other instance on the backend.
func TestReviewDirectOneInstanceStallsRevocationOfOthers(t *testing.T) {
	f := newLinkFixture(t, `{"clients": {"frontend": {"instances": ["vm1", "vm2"], "capabilities": ["guest"]}}}`)
	for _, id := range []string{"vm1", "vm2"} {
		if _, err := f.s.Create(context.Background(), id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		host := f.s.TPM(id, tpmrpc.Roles["host"])
		if rc := host.Init(0); rc != 0 {
			t.Fatalf("init: %#x", rc)
		}
		startup(t, host)
	}
	ctx := context.Background()
	open := func(id string) *attestedlink.DirectSession {
		sess, err := f.dialAt(ctx, f.addr)
		if err != nil {
			t.Fatal(err)
		}
		d, err := sess.Direct(ctx, id, gcm.AES256)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	d1, d2 := open("vm1"), open("vm2")
	p := startPipeliner(t, d1, getRandom)
	// Let a round of directLoop start and get stuck on vm1's worker.
	time.Sleep(1500 * time.Millisecond)
	// vm2 is taken from the client; vm1 stays.
	if err := os.WriteFile(f.aclFile, []byte(`{"clients": {"frontend": {"instances": ["vm1"], "capabilities": ["guest"]}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := f.acl.Reload(); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	var lastOK time.Time
	for time.Since(revoked) < 6*time.Second {
		resp, err := directExecute(d2, getRandom)
		if err != nil {
			break
		}
		if resp.Err == "" {
			lastOK = time.Now()
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.stop()
	after := lastOK.Sub(revoked)
	t.Logf("vm2's revoked session ran its last command %v after the revocation", after.Round(time.Millisecond))
	if after > 3*directSyncInterval {
		t.Errorf("a client revoked from vm2 kept its vm2 direct session %v after the revocation, because another instance's worker (vm1) was held", after.Round(time.Millisecond))
	}
}
