package keybroker

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emmansun/gmsm/sm2"
	"github.com/jackc/pgx/v5/pgxpool"
	bolt "go.etcd.io/bbolt"
	"google.golang.org/grpc"

	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/test/testenv"
)

// direct calls a Broker as a gRPC client would, with a hook to play the
// host in the middle.
type direct struct {
	b      *Broker
	onResp func(*capb.ReleaseKeysResponse)
	onReq  func(*capb.ReleaseKeysRequest)
}

func (d direct) KeyChallenge(ctx context.Context, in *capb.KeyChallengeRequest, _ ...grpc.CallOption) (*capb.KeyChallengeResponse, error) {
	return d.b.KeyChallenge(ctx, in)
}
func (d direct) ReleaseKeys(ctx context.Context, in *capb.ReleaseKeysRequest, _ ...grpc.CallOption) (*capb.ReleaseKeysResponse, error) {
	if d.onReq != nil {
		d.onReq(in)
	}
	r, err := d.b.ReleaseKeys(ctx, in)
	if err == nil && d.onResp != nil {
		d.onResp(r)
	}
	return r, err
}
func (d direct) Anchor(ctx context.Context, in *capb.AnchorRequest, _ ...grpc.CallOption) (*capb.AnchorResponse, error) {
	return d.b.Anchor(ctx, in)
}
func (d direct) Claim(ctx context.Context, in *capb.ClaimRequest, _ ...grpc.CallOption) (*capb.ClaimResponse, error) {
	return d.b.Claim(ctx, in)
}

type fixture struct {
	broker   *Broker
	sim      *csv.Simulator
	measure  [32]byte
	rootPub  any
	approved *csv.AppraisalPolicy
}

func newSim(t testing.TB, serial string, measure [32]byte, policy uint32) *csv.Simulator {
	sim, err := csv.NewSimulator(serial)
	if err != nil {
		t.Fatal(err)
	}
	if err := sim.SetVM(csv.VMConfig{Version: 1, Measure: measure, Policy: policy}); err != nil {
		t.Fatal(err)
	}
	return sim
}

func newFixture(t testing.TB, store Store, smKey bool) *fixture {
	f := &fixture{}
	copy(f.measure[:], bytes.Repeat([]byte{0x5a}, 32))
	f.sim = newSim(t, "SIMKB01", f.measure, 0x7)
	dir := t.TempDir()
	if err := f.sim.Save(dir); err != nil {
		t.Fatal(err)
	}
	f.approved = &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(dir, csv.SimRootFile)},
		ApprovedMeasurements: []string{strings.Repeat("5a", 32)}}
	if err := f.approved.Compile(); err != nil {
		t.Fatal(err)
	}
	kek := make([]byte, 32)
	rand.Read(kek)
	verifier := csv.NewVerifier(csv.VerifierOptions{TrustedRoots: f.approved.TrustedRoots(), Certs: csv.StaticSource{HSK: f.sim.HSK, CEK: f.sim.CEK}})
	f.broker = &Broker{Store: store, KEK: kek,
		Evidence: func() (*csv.AppraisalPolicy, *csv.Verifier) { return f.approved, verifier }}
	if smKey {
		k, _ := sm2.GenerateKey(rand.Reader)
		f.broker.Signer, f.rootPub = k, &k.PublicKey
	} else {
		k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		f.broker.Signer, f.rootPub = k, &k.PublicKey
	}
	return f
}

func (f *fixture) client(ev csv.ReportProvider) *Client {
	return &Client{KB: direct{b: f.broker}, RootPublic: f.rootPub, Evidence: ev}
}

func boltStore(t testing.TB) Store {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "ca.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	s, err := NewBoltStore(db)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestRelease(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store func(testing.TB) Store
		sm2   bool
	}{
		{"bbolt, ECDSA CA", boltStore, false},
		{"bbolt, SM2 CA", boltStore, true},
		{"postgresql", func(t testing.TB) Store {
			pool, err := pgxpool.New(context.Background(), testenv.StartPostgres(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			s, err := NewPGStore(context.Background(), pool)
			if err != nil {
				t.Fatal(err)
			}
			return s
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) { testRelease(t, newFixture(t, tc.store(t), tc.sm2)) })
	}
}

func testRelease(t *testing.T, f *fixture) {
	ctx := context.Background()
	c := f.client(f.sim)
	a, err := c.Release(ctx, "backend-a", "prod", "sm4-gcm")
	if err != nil {
		t.Fatal(err)
	}
	again, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm")
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Release(ctx, "backend-b", "prod", "aes-256-gcm")
	if err != nil {
		t.Fatal(err)
	}
	switch {
	case len(a.MasterKey) != 32 || len(a.MigrationKey) != 32:
		t.Fatalf("key sizes %d, %d", len(a.MasterKey), len(a.MigrationKey))
	case !bytes.Equal(a.MasterKey, again.MasterKey) || !bytes.Equal(a.MigrationKey, again.MigrationKey):
		t.Fatal("a second release gave other keys")
	case bytes.Equal(a.MasterKey, b.MasterKey):
		t.Fatal("two backends share a master key")
	case !bytes.Equal(a.MigrationKey, b.MigrationKey):
		t.Fatal("two backends of one migration domain have different migration keys")
	}
	// The latest release is each backend's session.
	ra, rb := NewReporter(c, "backend-a", "prod", again), NewReporter(c, "backend-b", "prod", b)
	// Anchors: raised by the backend (MAC under its master key), never
	// lowered, returned with the keys; a forged update is refused.
	if _, err := ra.Anchor(ctx, map[string]uint64{"vm1": 40, "vm2": 7}); err != nil {
		t.Fatal(err)
	}
	ra.Anchor(ctx, map[string]uint64{"vm1": 3})
	forged := &Reporter{C: c, BackendID: "backend-a", Domain: "prod", MasterKey: b.MasterKey, Lease: again.Lease}
	if _, err := forged.Anchor(ctx, map[string]uint64{"vm1": 1 << 40}); err == nil || !strings.Contains(err.Error(), "MAC does not verify") {
		t.Fatalf("anchor update under another backend's key: %v", err)
	}
	unknown := &Reporter{C: c, BackendID: "never-released", Domain: "prod", MasterKey: a.MasterKey}
	if _, err := unknown.Anchor(ctx, map[string]uint64{"vm1": 1}); err == nil {
		t.Fatal("anchor for an unknown backend accepted")
	}
	// The first release's session was superseded by the second.
	if _, err := NewReporter(c, "backend-a", "prod", a).Anchor(ctx, map[string]uint64{"vm1": 45}); err == nil || !strings.Contains(err.Error(), "another session") {
		t.Fatalf("report of a superseded session: %v", err)
	}
	r, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm")
	if err != nil {
		t.Fatal(err)
	}
	if r.Anchors["vm1"] != 40 || r.Anchors["vm2"] != 7 || len(r.Moved) != 0 {
		t.Fatalf("anchors %v, moved %v", r.Anchors, r.Moved)
	}
	ra = NewReporter(c, "backend-a", "prod", r)
	// Ownership: backend-b of the same domain cannot anchor vm1, nor claim
	// it with older state (a replayed export); with current state it takes
	// vm1 over, and backend-a's copy is stale from then on.
	if moved, err := rb.Anchor(ctx, map[string]uint64{"vm1": 100}); err != nil || moved["vm1"] != "backend-a" {
		t.Fatalf("backend-b anchoring vm1: %v, %v", moved, err)
	}
	if err := rb.Claim(ctx, "vm1", 39); err == nil || !strings.Contains(err.Error(), "older than the instance's anchored generation") {
		t.Fatalf("claim with older state: %v", err)
	}
	// A claim of generation 40 waits for the owner; the owner has moved on
	// to 41 (the export was not its last state): denied.
	go func() {
		time.Sleep(100 * time.Millisecond)
		ra.Anchor(ctx, map[string]uint64{"vm1": 41})
	}()
	if err := rb.Claim(ctx, "vm1", 40); err == nil || !strings.Contains(err.Error(), "has newer state") {
		t.Fatalf("claim of an export the owner has moved past: %v", err)
	}
	// A claim of the owner's current state: the owner hands over at its
	// next report, and its copy is stale from then on.
	handover := make(chan map[string]string, 1)
	go func() {
		time.Sleep(100 * time.Millisecond)
		moved, _ := ra.Anchor(ctx, map[string]uint64{"vm1": 41})
		handover <- moved
	}()
	if err := rb.Claim(ctx, "vm1", 41); err != nil {
		t.Fatal(err)
	}
	if moved := <-handover; moved["vm1"] != "backend-b" {
		t.Fatalf("the owner's report at the handover: moved %v", moved)
	}
	if moved, err := ra.Anchor(ctx, map[string]uint64{"vm1": 50}); err != nil || moved["vm1"] != "backend-b" {
		t.Fatalf("the stale source anchoring vm1: %v, %v", moved, err)
	}
	if r, _ := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); r.Moved["vm1"] != "backend-b" || r.Anchors["vm1"] != 0 {
		t.Fatalf("release to the old owner: anchors %v, moved %v", r.Anchors, r.Moved)
	} else {
		ra = NewReporter(c, "backend-a", "prod", r)
	}
	// A claim bounded by its context while the owner never answers.
	cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := ra.Claim(cctx, "vm1", 60); err == nil || !strings.Contains(err.Error(), "did not hand instance vm1 over") {
		t.Fatalf("claim without an answer from the owner: %v", err)
	}
	// A backend id stays in its migration domain: restarted without it
	// (or in another), it gets nothing (its anchors would be empty there).
	for _, d := range []string{"", "other"} {
		if _, err := c.Release(ctx, "backend-a", d, "aes-256-gcm"); err == nil || !strings.Contains(err.Error(), "another migration domain") {
			t.Fatalf("release of backend-a in domain %q: %v", d, err)
		}
	}
}

// What the host (or a backend the policy does not approve) tries.
func TestRefusals(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, boltStore(t), false)
	var other [32]byte
	for _, tc := range []struct {
		name string
		c    *Client
		want string
	}{
		{"unapproved measurement (the host's own image)", f.client(newSimSaved(t, f, other, 0x7)), csv.ReasonMeasurement},
		{"debuggable CVM", f.client(newSimSaved(t, f, f.measure, 0x6)), csv.ReasonDebug},
		{"host swaps the ephemeral key in transit", &Client{KB: direct{b: f.broker, onReq: func(r *capb.ReleaseKeysRequest) {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			pub, _ := k.PublicKey.ECDH()
			r.EphemeralPublic = pub.Bytes()
		}}, RootPublic: f.rootPub, Evidence: f.sim}, csv.ReasonReportData},
		{"host hands the backend keys of its own", &Client{KB: direct{b: f.broker, onResp: func(r *capb.ReleaseKeysResponse) {
			r.Wrapped[0] ^= 1
		}}, RootPublic: f.rootPub, Evidence: f.sim}, "signature does not verify"},
		{"host forges anchors", &Client{KB: direct{b: f.broker, onResp: func(r *capb.ReleaseKeysResponse) {
			r.Anchors = map[string]uint64{"vm1": 0}
		}}, RootPublic: f.rootPub, Evidence: f.sim}, "signature does not verify"},
		{"host reports a migration that did not happen", &Client{KB: direct{b: f.broker, onResp: func(r *capb.ReleaseKeysResponse) {
			r.Moved = map[string]string{"vm1": "elsewhere"}
		}}, RootPublic: f.rootPub, Evidence: f.sim}, "signature does not verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := tc.c.Release(ctx, "backend-a", "prod", "aes-256-gcm")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Release = %v, %v; want an error saying %q", r, err, tc.want)
			}
		})
	}
	// A nonce is used once.
	ch, _ := f.broker.KeyChallenge(ctx, nil)
	req := &capb.ReleaseKeysRequest{Nonce: ch.Nonce, BackendId: "b", Cipher: "aes-256-gcm", EphemeralPublic: mustEph(t)}
	rd := ReportData(req.Nonce, "b", "", req.EphemeralPublic, req.Cipher)
	req.CsvReport, _ = f.sim.Report(ctx, rd[:])
	if _, err := f.broker.ReleaseKeys(ctx, req); err != nil {
		t.Fatal(err)
	}
	if _, err := f.broker.ReleaseKeys(ctx, req); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("replayed request: %v", err)
	}
}

// newSimSaved is a second simulated chip under the fixture's root.
func newSimSaved(t *testing.T, f *fixture, measure [32]byte, policy uint32) *csv.Simulator {
	dir := t.TempDir()
	if err := f.sim.Save(dir); err != nil {
		t.Fatal(err)
	}
	s, err := csv.LoadSimulator(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetVM(csv.VMConfig{Version: 1, Measure: measure, Policy: policy}); err != nil {
		t.Fatal(err)
	}
	return s
}

func mustEph(t *testing.T) []byte {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	pub, _ := k.PublicKey.ECDH()
	return pub.Bytes()
}

// The broker judges each request by the policy in force at that moment
// (the CA's, which a SIGHUP replaces): a measurement the operator
// withdraws earns no more keys, without a restart.
func TestPolicyInForce(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, boltStore(t), false)
	c := f.client(f.sim)
	if _, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); err != nil {
		t.Fatal(err)
	}
	withdrawn := &csv.AppraisalPolicy{SimulatorRoots: f.approved.SimulatorRoots, ApprovedMeasurements: []string{strings.Repeat("77", 32)}}
	if err := withdrawn.Compile(); err != nil {
		t.Fatal(err)
	}
	f.approved = withdrawn
	if _, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); err == nil || !strings.Contains(err.Error(), csv.ReasonMeasurement) {
		t.Fatalf("release after the measurement was withdrawn: %v", err)
	}
}
