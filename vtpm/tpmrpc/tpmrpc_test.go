package tpmrpc

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"net"
	"strings"
	"testing"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
)

// startup and getRandom are raw TPM 2.0 commands.
var (
	startupClear = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}
	getRandom8   = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
)

func rcOf(resp []byte) uint32 { return binary.BigEndian.Uint32(resp[6:10]) }

// newRemote serves a real libtpms engine over a pipe and returns a Client.
func newRemote(t *testing.T) (*Client, *engine.TPM) {
	t.Helper()
	store, err := statestore.Open(t.TempDir(), statestore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	tpm, err := engine.New(store, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tpm.Close)
	a, b := net.Pipe()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ServeConn(ctx, b, tpm) }()
	t.Cleanup(func() {
		cancel()
		a.Close()
		<-done
	})
	return NewClient(NewConnCaller(a), ClientOptions{}), tpm
}

func TestClientAgainstEngine(t *testing.T) {
	c, _ := newRemote(t)
	if c.Running() {
		t.Fatal("TPM runs before Init")
	}
	if rc := c.Init(0); rc != 0 {
		t.Fatalf("Init rc %#x", rc)
	}
	if !c.Running() {
		t.Fatal("TPM not running after Init")
	}
	if r := c.Execute(nil, startupClear); rcOf(r) != 0 {
		t.Fatalf("Startup rc %#x", rcOf(r))
	}
	prefix := []byte("keep")
	r := c.ExecuteAt(prefix, getRandom8, 3)
	if !bytes.HasPrefix(r, prefix) || len(r) != len(prefix)+10+2+8 || rcOf(r[len(prefix):]) != 0 {
		t.Fatalf("GetRandom response %x", r)
	}
	if n := c.MaxCommandSize(); n < 4096 {
		t.Fatalf("MaxCommandSize %d", n)
	}
	size, lo, hi, err := c.SetBufferSize(0)
	if err != nil || size == 0 || lo > size || hi < size {
		t.Fatalf("SetBufferSize = %d %d %d %v", size, lo, hi, err)
	}
	if s, err := c.Info(1); err != nil || !strings.Contains(s, "TPMSpecification") {
		t.Fatalf("Info = %q, %v", s, err)
	}
	if _, rc := c.Established(); rc != 0 {
		t.Fatalf("Established rc %#x", rc)
	}
	blob, rc := c.GetState(1) // permanent
	if rc != 0 || len(blob) == 0 {
		t.Fatalf("GetState rc %#x, %d bytes", rc, len(blob))
	}
	c.Stop()
	if rc := c.SetState(1, blob); rc != 0 {
		t.Fatalf("SetState rc %#x", rc)
	}
	if c.Err() != nil {
		t.Fatal(c.Err())
	}
}

// A dead transport turns every call into a failure the caller can see, and
// a command into a TPM_RC_FAILURE response rather than a hang or garbage.
func TestClientTransportFailure(t *testing.T) {
	a, b := net.Pipe()
	b.Close()
	c := NewClient(NewConnCaller(a), ClientOptions{})
	r := c.Execute(nil, getRandom8)
	if len(r) != 10 || rcOf(r) != 0x101 {
		t.Fatalf("response %x, want TPM_RC_FAILURE", r)
	}
	if c.Err() == nil {
		t.Fatal("Err() is nil after a failed call")
	}
	if rc := c.Init(0); rc != rcFail {
		t.Fatalf("Init rc %#x, want TPM_FAIL", rc)
	}
}

func TestParseRequestRefuses(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"short", []byte{1, 0, 0}, "shorter than its 10-byte header"},
		{"unknown op", AppendRequest(nil, Request{Op: 99}), "unknown operation 99"},
		{"zero op", make([]byte, 10), "unknown operation 0"},
		{"locality", AppendRequest(nil, Request{Op: OpExecute, Locality: 5}), "locality 5"},
		{"huge", make([]byte, MaxMessage+1), "more than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseRequest(tc.in)
			if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	// Handle answers a malformed request with an error response and does
	// not touch the TPM (nil would panic).
	resp, err := ParseResponse(Handle(nil, []byte{0xff}, nil))
	if err != nil || !strings.Contains(resp.Err, "shorter") {
		t.Fatalf("Handle(malformed) = %+v, %v", resp, err)
	}
}

func TestRoundTrip(t *testing.T) {
	req := Request{Op: OpSetState, Locality: 2, Arg: 1<<40 | 7, Payload: []byte("blob")}
	got, err := ParseRequest(AppendRequest(nil, req))
	if err != nil || got.Op != req.Op || got.Locality != 2 || got.Arg != req.Arg || string(got.Payload) != "blob" {
		t.Fatalf("request round trip: %+v %v", got, err)
	}
	resp := Response{RC: 9, V: [3]uint32{1, 2, 3}, Payload: []byte("x")}
	gotResp, err := ParseResponse(AppendResponse(nil, resp))
	if err != nil || gotResp.RC != 9 || gotResp.V != resp.V || string(gotResp.Payload) != "x" {
		t.Fatalf("response round trip: %+v %v", gotResp, err)
	}
	gotResp, err = ParseResponse(AppendResponse(nil, Response{Err: "boom"}))
	if err != nil || gotResp.Err != "boom" {
		t.Fatalf("error response round trip: %+v %v", gotResp, err)
	}
}

func FuzzParseMessages(f *testing.F) {
	f.Add(AppendRequest(nil, Request{Op: OpExecute, Payload: getRandom8}))
	f.Add(AppendResponse(nil, Response{RC: 1, Payload: []byte{1, 2}}))
	f.Add(AppendResponse(nil, Response{Err: "e"}))
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := ParseRequest(b); err == nil {
			if !bytes.Equal(AppendRequest(nil, r), b) {
				t.Fatal("request does not re-encode to its input")
			}
		}
		if r, err := ParseResponse(b); err == nil && r.Err == "" && b[0] == 0 {
			if !bytes.Equal(AppendResponse(nil, r), b) {
				t.Fatal("response does not re-encode to its input")
			}
		}
		ReadMessage(bytes.NewReader(b), nil)
		if gen, blob, err := ParsePlainState(b); err == nil {
			if !bytes.Equal(AppendPlainState(nil, gen, blob), b) {
				t.Fatal("plain state message does not re-encode to its input")
			}
		}
	})
}

// FuzzCapabilities: for any request the link can carry, the guest role
// never gets state, H-CRTM, locality 4 or a reset, and nobody gets the
// backend's own operations.
func FuzzCapabilities(f *testing.F) {
	f.Add(AppendRequest(nil, Request{Op: OpExecute, Locality: 4, Arg: ExecuteAtLocality, Payload: getRandom8}))
	f.Add(AppendRequest(nil, Request{Op: OpGetState, Arg: 1}))
	f.Add(AppendRequest(nil, Request{Op: OpGeneration}))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err != nil {
			return
		}
		guestOK := Roles["guest"].Allow(r) == nil
		switch {
		case r.Op == OpGeneration && ((capEnd - 1).Allow(r) == nil):
			t.Fatal("the backend's own operation is allowed to a link caller")
		case guestOK && (r.Op == OpGetState || r.Op == OpSetState || r.Op == OpHashStart || r.Op == OpHashData ||
			r.Op == OpHashEnd || r.Op == OpInit || r.Op == OpStop):
			t.Fatalf("guest allowed %v", r.Op)
		case guestOK && r.Locality == 4 && (r.Op == OpExecute && r.Arg&ExecuteAtLocality != 0 || r.Op == OpSetLocality || r.Op == OpResetEstablished):
			t.Fatalf("guest allowed %v at locality 4", r.Op)
		}
	})
}
