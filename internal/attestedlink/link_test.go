package attestedlink

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/vtpm/tpmrpc"
)

var goodMeasure = [32]byte{0xc0, 0xff, 0xee}

// pki is a client CA with one client certificate.
type pki struct {
	pool   *x509.CertPool
	client tls.Certificate
}

func newPKI(t testing.TB, cn string) pki {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test link CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pki{pool: pool, client: tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}}
}

// counter is a Handler whose state is a count per instance: a call
// "increments" and answers the new count, so a test sees exactly which
// calls reached the backend.
type counter struct {
	mu    sync.Mutex
	n     map[string]int
	bytes [][]byte
}

func (c *counter) Call(_ context.Context, instance string, _ tpmrpc.Capabilities, req, dst []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n[instance]++
	c.bytes = append(c.bytes, bytes.Clone(req))
	return binary.BigEndian.AppendUint32(append(dst, req...), uint32(c.n[instance])), nil
}

func (c *counter) count(instance string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n[instance]
}

type acl map[string][]string

func (a acl) Authorize(_ context.Context, peer *Peer, instance string) (tpmrpc.Capabilities, error) {
	for _, i := range a[peer.Certificate.Subject.CommonName] {
		if i == instance {
			return tpmrpc.Roles["guest"], nil
		}
	}
	return 0, errors.New("not in the access list")
}

// fixture is a running server with a simulated CSV device.
type fixture struct {
	sim     *csv.Simulator
	pki     pki
	handler *counter
	addr    string
	policy  *csv.AppraisalPolicy
	server  *Server
}

type providerFunc func(ctx context.Context, rd []byte) ([]byte, error)

func (f providerFunc) Report(ctx context.Context, rd []byte) ([]byte, error) { return f(ctx, rd) }

func newFixture(t testing.TB, vmPolicy uint32) *fixture {
	t.Helper()
	return newFixtureLogged(t, vmPolicy, nil)
}

// newFixtureLogged is newFixture with the server logging to log (nil: none).
func newFixtureLogged(t testing.TB, vmPolicy uint32, log *slog.Logger) *fixture {
	t.Helper()
	sim, err := csv.NewSimulator("SIMLINK01")
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.SetVM(csv.VMConfig{Version: 1, Measure: goodMeasure, Policy: vmPolicy}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	root := filepath.Join(dir, "sim-hrk.cert")
	os.WriteFile(root, sim.HRK.Marshal(), 0o600)
	policy := &csv.AppraisalPolicy{SimulatorRoots: []string{root}, ApprovedMeasurements: []string{hex.EncodeToString(goodMeasure[:])}}
	if err := policy.Compile(); err != nil {
		t.Fatal(err)
	}
	p := newPKI(t, "frontend-vm1")
	cert, err := EphemeralCertificate()
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{sim: sim, pki: p, handler: &counter{n: map[string]int{}}, policy: policy}
	f.server = &Server{
		TLS:        &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: p.pool},
		Evidence:   sim,
		HSKCEK:     csv.MarshalHSKCEK(sim.HSK, sim.CEK),
		Authorizer: acl{"frontend-vm1": {"vm1"}},
		Handler:    f.handler,
		Logger:     log,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { f.server.Serve(ctx, ln); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	f.addr = ln.Addr().String()
	return f
}

func (f *fixture) dial(t testing.TB, addr string, policy *csv.AppraisalPolicy) (*Session, error) {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return Dial(context.Background(), conn, ClientConfig{Certificate: f.pki.client, Policy: policy, HandshakeTimeout: 5 * time.Second})
}

func TestSession(t *testing.T) {
	f := newFixture(t, 0x7) // NODBG | NOKS | ES
	s, err := f.dial(t, f.addr, f.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if c := s.Claims(); !c.Simulated || !bytes.Equal(c.Measure, goodMeasure[:]) {
		t.Fatalf("claims %+v", c)
	}
	for i := 1; i <= 3; i++ {
		resp, err := s.Call(context.Background(), "vm1", []byte("cmd"))
		if err != nil {
			t.Fatal(err)
		}
		if want := binary.BigEndian.AppendUint32([]byte("cmd"), uint32(i)); !bytes.Equal(resp, want) {
			t.Fatalf("call %d: response %x, want %x", i, resp, want)
		}
	}
	// Another instance than the ACL names ends the session.
	_, err = s.Call(context.Background(), "vm2", []byte("cmd"))
	var re *RemoteError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), `may not use instance "vm2"`) {
		t.Fatalf("unauthorised instance: err = %v", err)
	}
	if f.handler.count("vm2") != 0 {
		t.Fatal("a call for an unauthorised instance reached the handler")
	}
	if _, err := s.Call(context.Background(), "vm1", []byte("cmd")); err == nil {
		t.Fatal("session still usable after an error")
	}
}

// Evidence that fails the client's policy is refused before any call.
func TestEvidenceRefused(t *testing.T) {
	good := newFixture(t, 0x7)
	debug := newFixture(t, 0x6) // NODBG not set
	strict := &csv.AppraisalPolicy{ApprovedMeasurements: good.policy.ApprovedMeasurements}
	if err := strict.Compile(); err != nil {
		t.Fatal(err)
	}
	otherMeasure := *good.policy
	otherMeasure.ApprovedMeasurements = []string{strings.Repeat("ab", 32)}

	// A backend that answers with a report for other report_data, e.g.
	// one relayed from another session.
	stale := newFixture(t, 0x7)
	stale.server.Evidence = providerFunc(func(ctx context.Context, rd []byte) ([]byte, error) {
		return stale.sim.Report(ctx, make([]byte, 64))
	})
	stalePolicy := *good.policy
	stalePolicy.SimulatorRoots = nil
	// stale has its own simulator root: trust it.
	root := filepath.Join(t.TempDir(), "root")
	os.WriteFile(root, stale.sim.HRK.Marshal(), 0o600)
	stalePolicy.SimulatorRoots = []string{root}
	if err := stalePolicy.Compile(); err != nil {
		t.Fatal(err)
	}
	debugPolicy := *good.policy
	root2 := filepath.Join(t.TempDir(), "root")
	os.WriteFile(root2, debug.sim.HRK.Marshal(), 0o600)
	debugPolicy.SimulatorRoots = []string{root2}
	if err := debugPolicy.Compile(); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		f      *fixture
		policy *csv.AppraisalPolicy
		reason string
	}{
		{"simulated root, only the real HRK trusted", good, strict, csv.ReasonUntrustedRoot},
		{"debug policy", debug, &debugPolicy, csv.ReasonDebug},
		{"unexpected measurement", good, &otherMeasure, csv.ReasonMeasurement},
		{"report_data for another session", stale, &stalePolicy, csv.ReasonReportData},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.f.dial(t, tc.f.addr, tc.policy)
			var ee *EvidenceError
			if !errors.As(err, &ee) || ee.Reason != tc.reason {
				t.Fatalf("err = %v, want reason %s", err, tc.reason)
			}
			if n := len(tc.f.handler.bytes); n != 0 {
				t.Fatalf("%d calls reached the backend", n)
			}
		})
	}
}

// An unknown client certificate fails the TLS handshake.
func TestUnknownClientRefused(t *testing.T) {
	f := newFixture(t, 0x7)
	stranger := newPKI(t, "frontend-vm1") // same name, other CA
	conn, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Dial(context.Background(), conn, ClientConfig{Certificate: stranger.client, Policy: f.policy, HandshakeTimeout: 5 * time.Second})
	if err == nil {
		t.Fatal("a client certificate from another CA was accepted")
	}
}

// mitm relays TCP between client and server at TLS-record granularity and
// lets a test tamper with the records of one direction once armed.
type mitm struct {
	addr   string
	mu     sync.Mutex
	tamper func(records [][]byte) [][]byte // nil: pass through
	toSrv  bool                            // tamper client->server (else server->client)
}

func newMITM(t testing.TB, target string) *mitm {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &mitm{addr: ln.Addr().String()}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				return
			}
			go m.pipe(c, s, true)
			go m.pipe(s, c, false)
		}
	}()
	return m
}

func (m *mitm) arm(toServer bool, f func([][]byte) [][]byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.toSrv, m.tamper = toServer, f
}

// pipe copies TLS records from src to dst. Records arriving together are
// handed to the tamper function as a group (a large frame spans several).
func (m *mitm) pipe(src, dst net.Conn, toServer bool) {
	defer dst.Close()
	defer src.Close()
	for {
		var recs [][]byte
		rec, err := readRecord(src)
		if err != nil {
			return
		}
		recs = append(recs, rec)
		// Collect records already in flight.
		for {
			src.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			rec, err := readRecord(src)
			src.SetReadDeadline(time.Time{})
			if err != nil {
				break
			}
			recs = append(recs, rec)
		}
		m.mu.Lock()
		if m.tamper != nil && m.toSrv == toServer && recs[0][0] == 23 {
			recs = m.tamper(recs)
			m.tamper = nil
		}
		m.mu.Unlock()
		for _, r := range recs {
			if _, err := dst.Write(r); err != nil {
				return
			}
		}
	}
}

func readRecord(r net.Conn) ([]byte, error) {
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, err
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:5]))
	if _, err := io.ReadFull(r, body); err != nil {
		return nil, err
	}
	return append(hdr, body...), nil
}

// Every manipulation of the bytes between relay and backend ends the
// session with an error; no altered request reaches the handler and no
// altered response reaches the caller.
func TestManInTheMiddle(t *testing.T) {
	big := bytes.Repeat([]byte("B"), 40<<10) // spans three TLS records
	var lastRecord []byte
	for _, tc := range []struct {
		name     string
		toServer bool
		req      []byte
		tamper   func([][]byte) [][]byte
		executes bool // the tampered call legitimately ran once (replay)
	}{
		{"flip a request byte", true, []byte("cmd"), func(r [][]byte) [][]byte { r[0][len(r[0])-3] ^= 1; return r }, false},
		{"flip a response byte", false, []byte("cmd"), func(r [][]byte) [][]byte { r[0][7] ^= 0x80; return r }, true},
		{"drop the request", true, []byte("cmd"), func(r [][]byte) [][]byte { return nil }, false},
		{"truncate the request", true, []byte("cmd"), func(r [][]byte) [][]byte { r[0] = r[0][:len(r[0])-4]; return r }, false},
		{"replay the request", true, []byte("cmd"), func(r [][]byte) [][]byte { return append(r, r[0]) }, true},
		{"replay an old request", true, []byte("cmd"), func(r [][]byte) [][]byte { return [][]byte{lastRecord} }, false},
		{"reorder request records", true, big, func(r [][]byte) [][]byte {
			if len(r) < 2 {
				t.Errorf("large request came as %d records", len(r))
				return r
			}
			r[0], r[1] = r[1], r[0]
			return r
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, 0x7)
			m := newMITM(t, f.addr)
			s, err := f.dial(t, m.addr, f.policy)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			// One clean call, remembered for the "old request" replay.
			m.arm(true, func(r [][]byte) [][]byte { lastRecord = bytes.Clone(r[0]); return r })
			if _, err := s.Call(context.Background(), "vm1", []byte("cmd")); err != nil {
				t.Fatal(err)
			}
			before := f.handler.count("vm1")
			m.arm(tc.toServer, tc.tamper)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			resp, err := s.Call(ctx, "vm1", tc.req)
			if err == nil {
				// A replayed record may trail the genuine one: the next
				// call must then fail.
				if !bytes.HasPrefix(resp, tc.req) {
					t.Fatalf("altered response reached the caller: %q", resp)
				}
				_, err = s.Call(ctx, "vm1", []byte("cmd"))
			}
			if err == nil {
				t.Fatal("session survived the manipulation")
			}
			want := before
			if tc.executes {
				want++
			}
			time.Sleep(50 * time.Millisecond)
			if got := f.handler.count("vm1"); got != want {
				t.Fatalf("handler ran %d times after the manipulation, want %d", got-before, want-before)
			}
			for _, b := range f.handler.bytes {
				if !bytes.Equal(b, []byte("cmd")) && !bytes.Equal(b, big) {
					t.Fatalf("an altered request reached the handler: %q", b)
				}
			}
			if _, err := s.Call(context.Background(), "vm1", []byte("cmd")); err == nil {
				t.Fatal("session usable after the error")
			}
		})
	}
}

// The frame layer refuses replays and reordering by itself too (defence in
// depth below TLS).
func TestFramerSequence(t *testing.T) {
	var buf bytes.Buffer
	w := newFramer(&buf)
	w.write(frameRequest, "vm1", []byte("a"))
	first := bytes.Clone(buf.Bytes())
	w.write(frameRequest, "vm1", []byte("b"))
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"replayed", append(bytes.Clone(first), first...), "sequence number 0, want 1"},
		{"reordered", append(bytes.Clone(buf.Bytes()[len(first):]), first...), "sequence number 1, want 0"},
		{"truncated", first[:len(first)-1], "truncated"},
		{"bad version", append([]byte{0, 0, 0, 13, 9}, first[5:]...), "version 9"},
		{"huge", []byte{0xff, 0xff, 0xff, 0xff, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, "frame length"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newFramer(bytes.NewBuffer(tc.in))
			var err error
			for err == nil {
				_, err = r.read(frameRequest)
			}
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func FuzzFrames(f *testing.F) {
	var buf bytes.Buffer
	w := newFramer(&buf)
	w.write(frameHello, "", make([]byte, 32))
	w.write(frameRequest, "vm1", []byte("abc"))
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		r := newFramer(bytes.NewBuffer(b))
		for {
			fr, err := r.read(frameHello, frameEvidence, frameRequest, frameResponse)
			if err != nil {
				break
			}
			if fr.typ == frameEvidence {
				splitEvidence(fr.payload)
			}
		}
	})
}
