package backend

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/attestedlink"
	"cvtpm/internal/directlink"
	"cvtpm/internal/gcm"
	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
)

// tapRelay is the host between a guest and the backend: it relays the
// bytes of every connection, keeps a copy of them, and may alter what
// the guest sends once armed.
type tapRelay struct {
	addr string
	mu   sync.Mutex
	seen bytes.Buffer
	// tamper, if set, may change a chunk the guest sends (in place).
	tamper func(chunk []byte)
}

func startTapRelay(t *testing.T, backend string) *tapRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	r := &tapRelay{addr: ln.Addr().String()}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", backend)
			if err != nil {
				c.Close()
				continue
			}
			go r.pipe(c, b, true)
			go r.pipe(b, c, false)
		}
	}()
	return r
}

func (r *tapRelay) pipe(src, dst net.Conn, fromGuest bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			r.mu.Lock()
			r.seen.Write(buf[:n])
			if fromGuest && r.tamper != nil {
				r.tamper(buf[:n])
			}
			r.mu.Unlock()
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *tapRelay) captured() []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Clone(r.seen.Bytes())
}

func (r *tapRelay) arm(f func(chunk []byte)) {
	r.mu.Lock()
	r.tamper = f
	r.mu.Unlock()
}

func (f *linkFixture) dialAt(ctx context.Context, addr string) (*attestedlink.Session, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return attestedlink.Dial(ctx, conn, attestedlink.ClientConfig{Certificate: f.client, Policy: f.policy})
}

// directFixture is a backend with instance vm1 started up (by the host,
// through the supervisor), a guest client "frontend" with the role the
// ACL gives, and a relay the guest's sessions go through.
func directFixture(t *testing.T, role string) (*linkFixture, *tapRelay, *tpmrpc.Client) {
	t.Helper()
	return directFixtureLogging(t, role, nil)
}

func directFixtureLogging(t *testing.T, role string, log *slog.Logger) (*linkFixture, *tapRelay, *tpmrpc.Client) {
	t.Helper()
	f := newLinkFixtureLogging(t, `{"clients": {"frontend": {"instances": ["vm1"], "capabilities": ["`+role+`"]}}}`, log)
	if _, err := f.s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	host := f.s.TPM("vm1", tpmrpc.Roles["host"]|tpmrpc.CapLocality4)
	if rc := host.Init(0); rc != 0 {
		t.Fatalf("init: %#x", rc)
	}
	startup(t, host)
	return f, startTapRelay(t, f.addr), host
}

func openDirect(t testing.TB, f *linkFixture, addr, cipher string) *attestedlink.DirectSession {
	t.Helper()
	ctx := context.Background()
	sess, err := f.dialAt(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	d, err := sess.Direct(ctx, "vm1", cipher)
	if err != nil {
		t.Fatalf("direct session: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// directExecute sends one TPM command through d and returns the tpmrpc
// response (or the session's error).
func directExecute(d *attestedlink.DirectSession, cmd []byte) (tpmrpc.Response, error) {
	out, err := d.Call(context.Background(), tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: cmd}))
	if err != nil {
		return tpmrpc.Response{}, err
	}
	return tpmrpc.ParseResponse(out)
}

// marshalCommand is cmd's TPM command bytes.
func marshalCommand[C tpm2.Command[R, *R], R any](t testing.TB, cmd C) []byte {
	t.Helper()
	var rec recordingTPM
	cmd.Execute(&rec)
	if rec.cmd == nil {
		t.Fatal("no command recorded")
	}
	return rec.cmd
}

// recordingTPM keeps the command it is sent and fails it.
type recordingTPM struct{ cmd []byte }

func (r *recordingTPM) Send(cmd []byte) ([]byte, error) {
	r.cmd = bytes.Clone(cmd)
	return nil, errors.New("recorded")
}

func responseRC(t *testing.T, resp tpmrpc.Response) uint32 {
	t.Helper()
	if resp.Err != "" {
		t.Fatalf("refused: %s", resp.Err)
	}
	if len(resp.Payload) < 10 {
		t.Fatalf("response of %d bytes", len(resp.Payload))
	}
	return uint32(resp.Payload[6])<<24 | uint32(resp.Payload[7])<<16 | uint32(resp.Payload[8])<<8 | uint32(resp.Payload[9])
}

// A direct session runs TPM commands in the worker, for both ciphers, and
// the host that relays it sees neither the command nor the answer.
func TestDirectSessionServesAndHidesCommands(t *testing.T) {
	f, relay, _ := directFixture(t, "guest")
	marker := []byte("direct-session-plaintext-marker-0123456789")
	hash := marshalCommand(t, tpm2.Hash{Data: tpm2.TPM2BMaxBuffer{Buffer: marker}, HashAlg: tpm2.TPMAlgSHA256, Hierarchy: tpm2.TPMRHOwner})
	for _, cipher := range []string{gcm.AES256, gcm.SM4} {
		d := openDirect(t, f, relay.addr, cipher)
		for i := 0; i < 3; i++ {
			resp, err := directExecute(d, hash)
			if err != nil {
				t.Fatalf("%s: %v", cipher, err)
			}
			if rc := responseRC(t, resp); rc != 0 {
				t.Fatalf("%s: TPM2_Hash rc %#x", cipher, rc)
			}
			if bytes.Contains(relay.captured(), resp.Payload[10:42]) {
				t.Fatalf("%s: the relay saw the answer", cipher)
			}
		}
	}
	if bytes.Contains(relay.captured(), marker) {
		t.Fatal("the relay saw the command in the clear")
	}
	inst := f.s.lookup("vm1")
	inst.mu.Lock()
	n := len(inst.direct)
	inst.mu.Unlock()
	if n != 2 {
		t.Fatalf("the supervisor records %d direct sessions, want 2", n)
	}
}

// The worker refuses what only the supervisor may answer or follow, and
// checks each command at the TPM's current locality, as the supervisor
// does: a guest session cannot run a command at the locality 4 the host
// left.
func TestDirectSessionChecksLocalityAndOperation(t *testing.T) {
	f, relay, host := directFixture(t, "guest")
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	for _, r := range []tpmrpc.Request{
		{Op: tpmrpc.OpInit},
		{Op: tpmrpc.OpSetLocality, Locality: 0},
		{Op: tpmrpc.OpExecute, Arg: tpmrpc.ExecuteAtLocality, Locality: 0, Payload: getRandom},
		{Op: tpmrpc.OpExecute, Payload: marshalCommand(t, tpm2.Startup{StartupType: tpm2.TPMSUClear})},
		{Op: tpmrpc.OpExecute, Payload: marshalCommand(t, tpm2.GetCapability{Capability: tpm2.TPMCapCommands, PropertyCount: 1})},
		{Op: tpmrpc.OpDirectSync},
	} {
		out, err := d.Call(context.Background(), tpmrpc.AppendRequest(nil, r))
		if err != nil {
			t.Fatalf("%v: %v", r.Op, err)
		}
		resp, err := tpmrpc.ParseResponse(out)
		if err != nil || !strings.Contains(resp.Err, "does not go through a direct session") {
			t.Fatalf("%v through a direct session: %+v, %v", r.Op, resp, err)
		}
	}
	if rc := host.SetLocality(4); rc != 0 {
		t.Fatalf("host set-locality 4: %#x", rc)
	}
	resp, err := directExecute(d, getRandom)
	if err != nil || !strings.Contains(resp.Err, "locality 4") {
		t.Fatalf("command at the host's locality 4 through a guest's direct session: %+v, %v", resp, err)
	}
	host.SetLocality(0)
	resp, err = directExecute(d, getRandom)
	if err != nil {
		t.Fatal(err)
	}
	if rc := responseRC(t, resp); rc != 0 {
		t.Fatalf("GetRandom at locality 0: %#x", rc)
	}
}

// refusedExecutes reads cvtpm_backend_calls_refused_total{op="execute"}.
func refusedExecutes(t *testing.T) float64 {
	t.Helper()
	return counterValue(t, refusedCalls.WithLabelValues(tpmrpc.OpExecute.String()))
}

// A command the worker refuses on a direct session is counted in
// cvtpm_backend_calls_refused_total and logged by the supervisor, as a
// refusal of its own callers is: the supervisor never sees the command,
// so the worker reports it at the next sync.
func TestDirectSessionRefusalsAreCountedAndLogged(t *testing.T) {
	var logged testenv.SyncBuffer
	f, relay, host := directFixtureLogging(t, "guest", slog.New(slog.NewTextHandler(&logged, nil)))
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	before := refusedExecutes(t)
	callsBefore, secondsBefore := counterValue(t, directCalls), counterValue(t, directCallSeconds)
	if rc := host.SetLocality(4); rc != 0 {
		t.Fatalf("host set-locality 4: %#x", rc)
	}
	for range 3 {
		if resp, err := directExecute(d, getRandom); err != nil || !strings.Contains(resp.Err, "locality 4") {
			t.Fatalf("command at the host's locality 4 through a guest's direct session: %+v, %v", resp, err)
		}
	}
	host.SetLocality(0)
	deadline := time.Now().Add(5 * directSyncInterval)
	for refusedExecutes(t)-before < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("refusals counted: %v, want 3; log:\n%s", refusedExecutes(t)-before, logged.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	line := ""
	for _, l := range strings.Split(logged.String(), "\n") {
		if strings.Contains(l, "call refused") {
			line = l
		}
	}
	for _, want := range []string{"instance=vm1", "client=frontend", "direct_session=", "calls=3", "locality 4"} {
		if !strings.Contains(line, want) {
			t.Errorf("the refusal's log line %q lacks %q", line, want)
		}
	}
	// Served afterwards, and not counted again.
	if resp, err := directExecute(d, getRandom); err != nil || responseRC(t, resp) != 0 {
		t.Fatalf("GetRandom at locality 0: %+v, %v", resp, err)
	}
	time.Sleep(2 * directSyncInterval)
	if n := refusedExecutes(t) - before; n != 3 {
		t.Errorf("refusals counted after a served command and two syncs: %v, want 3", n)
	}
	// Every call the worker answered is counted, with its time: the
	// supervisor's own call metrics never see them.
	if n := counterValue(t, directCalls) - callsBefore; n != 4 {
		t.Errorf("cvtpm_backend_direct_calls_total grew by %v, want 4 (3 refused, 1 served)", n)
	}
	if d := counterValue(t, directCallSeconds) - secondsBefore; d <= 0 || d > 1 {
		t.Errorf("cvtpm_backend_direct_call_seconds_total grew by %v s for 4 calls", d)
	}
}

// A host reset (init) or state transfer ends the direct sessions before it
// runs; a DirectCaller sends its next command on a new session.
func TestDirectSessionEndsOnHostReset(t *testing.T) {
	f, relay, host := directFixture(t, "guest")
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if _, err := directExecute(d, getRandom); err != nil {
		t.Fatal(err)
	}
	if rc := host.Init(0); rc != 0 {
		t.Fatalf("init: %#x", rc)
	}
	if _, err := directExecute(d, getRandom); err == nil {
		t.Fatal("the direct session outlived the host's reset")
	}

	dial := func(ctx context.Context) (*attestedlink.Session, error) { return f.dialAt(ctx, relay.addr) }
	guest, caller := attestedlink.RemoteTPMDirect("vm1", gcm.AES256, dial, nil)
	defer caller.Close()
	startup(t, host)
	for i := 0; i < 2; i++ {
		if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(guest); err != nil {
			t.Fatalf("GetRandom %d: %v", i, err)
		}
		if i == 0 {
			if rc := host.Init(0); rc != 0 {
				t.Fatalf("init: %#x", rc)
			}
			startup(t, host)
		}
	}
	// The supervisor learns of the sessions the worker ended at its next
	// round.
	deadline := time.Now().Add(3 * directSyncInterval)
	for n := directCount(f.s, "vm1"); n != 1; n = directCount(f.s, "vm1") {
		if time.Now().After(deadline) {
			t.Fatalf("%d direct sessions after the reset, want the DirectCaller's new one", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func directCount(s *Supervisor, id string) int {
	inst := s.lookup(id)
	inst.mu.Lock()
	defer inst.mu.Unlock()
	inst.pruneDirect()
	n := 0
	for range inst.direct {
		n++
	}
	return n
}

// A client the ACL no longer names loses its direct session within the
// supervisor's next round (directSyncInterval), as it loses its calls
// through the supervisor at once.
func TestDirectSessionEndsWhenAccessIsRevoked(t *testing.T) {
	f, relay, _ := directFixture(t, "guest")
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if _, err := directExecute(d, getRandom); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f.aclFile, []byte(`{"clients": {"frontend": {"instances": ["vm2"], "capabilities": ["guest"]}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := f.acl.Reload(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * directSyncInterval)
	for {
		_, err := directExecute(d, getRandom)
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the direct session still serves %v after the ACL dropped its client", 3*directSyncInterval)
		}
		time.Sleep(50 * time.Millisecond)
	}
	sess, err := f.dialAt(context.Background(), relay.addr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sess.Direct(context.Background(), "vm1", gcm.AES256); err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("a revoked client got a new direct session: %v", err)
	}
}

// Bytes the host alters end the session (and only it); the worker goes
// on serving others.
func TestDirectSessionEndsOnTamperedRecord(t *testing.T) {
	f, relay, _ := directFixture(t, "guest")
	d := openDirect(t, f, relay.addr, gcm.AES256)
	getRandom := marshalCommand(t, tpm2.GetRandom{BytesRequested: 8})
	if _, err := directExecute(d, getRandom); err != nil {
		t.Fatal(err)
	}
	relay.arm(func(chunk []byte) { chunk[len(chunk)-1] ^= 1 })
	// The worker refuses the record and ends the session, saying (sealed)
	// that it did not run the command.
	if _, err := directExecute(d, getRandom); !errors.Is(err, directlink.ErrEnded) {
		t.Fatalf("a tampered record: %v", err)
	}
	relay.arm(nil)
	d2 := openDirect(t, f, relay.addr, gcm.SM4)
	resp, err := directExecute(d2, getRandom)
	if err != nil {
		t.Fatal(err)
	}
	if rc := responseRC(t, resp); rc != 0 {
		t.Fatalf("GetRandom on a new session: %#x", rc)
	}
}

// A direct session must be the session's first request, and is only
// given for an instance the client may use.
func TestDirectSessionRefusals(t *testing.T) {
	f, relay, _ := directFixture(t, "guest")
	ctx := context.Background()
	sess, err := f.dialAt(ctx, relay.addr)
	if err != nil {
		t.Fatal(err)
	}
	if r := linkCall(t, sess, "vm1", tpmrpc.Request{Op: tpmrpc.OpRunning}); r.Err != "" {
		t.Fatal(r.Err)
	}
	if _, err := sess.Direct(ctx, "vm1", gcm.AES256); err == nil || !strings.Contains(err.Error(), "before any request") {
		t.Fatalf("direct session after a request: %v", err)
	}
	for _, c := range []struct{ instance, cipher, want string }{
		{"vm2", gcm.AES256, "not allowed"},
		{"vm1", "rc4", "cipher"},
	} {
		sess, err := f.dialAt(ctx, relay.addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sess.Direct(ctx, c.instance, c.cipher); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Fatalf("direct session for %s with %s: %v, want %q", c.instance, c.cipher, err, c.want)
		}
	}
}
