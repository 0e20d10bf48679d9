package keybroker

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/emmansun/gmsm/smx509"

	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
)

// Client is the backend's side: it proves itself and receives its keys.
type Client struct {
	KB capb.KeyBrokerClient
	// RootPublic is the public key of the CA certificate the backend
	// trusts to sign the broker's answers.
	RootPublic any
	// Evidence makes the backend's CSV report.
	Evidence csv.ReportProvider
}

// RootPublicFromFile reads the CA certificate (PEM; ECDSA, RSA or SM2).
func RootPublicFromFile(path string) (any, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM certificate in it", path)
	}
	cert, err := smx509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cert.PublicKey, nil
}

// Released is what the broker released.
type Released struct {
	MasterKey    []byte
	MigrationKey []byte            // nil without a migration domain
	Anchors      map[string]uint64 // instances this backend owns: highest generation
	Moved        map[string]string // instances another backend owns now
	// Lease and LastCounter: this release's session at the broker; its
	// reports (Anchor) carry the lease and counters above LastCounter.
	Lease       []byte
	LastCounter uint64
}

// Release attests to the broker and returns the keys.
func (c *Client) Release(ctx context.Context, backendID, domain, cipherName string) (*Released, error) {
	ch, err := c.KB.KeyChallenge(ctx, &capb.KeyChallengeRequest{})
	if err != nil {
		return nil, fmt.Errorf("key broker challenge: %w", err)
	}
	eph, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	pub := eph.PublicKey().Bytes()
	rd := ReportData(ch.GetNonce(), backendID, domain, pub, cipherName)
	report, err := c.Evidence.Report(ctx, rd[:])
	if err != nil {
		return nil, fmt.Errorf("CSV report for the key broker: %w", err)
	}
	resp, err := c.KB.ReleaseKeys(ctx, &capb.ReleaseKeysRequest{Nonce: ch.GetNonce(), BackendId: backendID, MigrationDomain: domain,
		EphemeralPublic: pub, Cipher: cipherName, CsvReport: report})
	if err != nil {
		return nil, fmt.Errorf("key broker: %w", err)
	}
	if err := verify(c.RootPublic, Transcript(rd, resp.GetBrokerPublic(), resp.GetWrapped(), resp.GetAnchors(), resp.GetMoved(), resp.GetLease(), resp.GetLastCounter()), resp.GetSignature()); err != nil {
		return nil, err
	}
	peer, err := ecdh.P256().NewPublicKey(resp.GetBrokerPublic())
	if err != nil {
		return nil, fmt.Errorf("key broker response: broker key: %w", err)
	}
	shared, err := eph.ECDH(peer)
	if err != nil {
		return nil, err
	}
	aead, err := wrapAEAD(shared, ch.GetNonce(), cipherName)
	if err != nil {
		return nil, err
	}
	plain, err := aead.Open(nil, zeroNonce, resp.GetWrapped(), rd[:])
	if err != nil {
		return nil, fmt.Errorf("key broker response: wrapped keys do not open")
	}
	want := KeySize
	if domain != "" {
		want = 2 * KeySize
	}
	if len(plain) != want {
		return nil, fmt.Errorf("key broker response: %d bytes of keys, want %d", len(plain), want)
	}
	r := &Released{MasterKey: plain[:KeySize], Anchors: resp.GetAnchors(), Moved: resp.GetMoved(), Lease: resp.GetLease(), LastCounter: resp.GetLastCounter()}
	if domain != "" {
		r.MigrationKey = plain[KeySize:]
	}
	if r.Anchors == nil {
		r.Anchors = map[string]uint64{}
	}
	return r, nil
}

// Anchor records instance generations at the broker; it returns the
// instances another backend owns now (this backend's copies are stale).
// counter must grow with every report of the session (Reporter does it).
func (c *Client) Anchor(ctx context.Context, backendID, domain string, masterKey, lease []byte, counter uint64, gens map[string]uint64) (map[string]string, error) {
	mac, err := AnchorMAC(masterKey, backendID, domain, lease, counter, gens)
	if err != nil {
		return nil, err
	}
	resp, err := c.KB.Anchor(ctx, &capb.AnchorRequest{BackendId: backendID, MigrationDomain: domain, Generations: gens, Mac: mac,
		Lease: lease, Counter: counter})
	if err != nil {
		return nil, fmt.Errorf("key broker anchor: %w", err)
	}
	return resp.GetMoved(), nil
}

// Reporter is a released backend's reporting end: Anchor and Claim with
// its keys, its session and counters that only grow.
type Reporter struct {
	C                 *Client
	BackendID, Domain string
	MasterKey, Lease  []byte

	mu      sync.Mutex
	counter uint64
}

// NewReporter continues r's session above its last counter.
func NewReporter(c *Client, backendID, domain string, r *Released) *Reporter {
	return &Reporter{C: c, BackendID: backendID, Domain: domain, MasterKey: bytes.Clone(r.MasterKey), Lease: r.Lease, counter: r.LastCounter}
}

// Anchor reports generations (one report at a time, so counters arrive in
// order).
func (p *Reporter) Anchor(ctx context.Context, gens map[string]uint64) (map[string]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	// Time-based, so a restarted backend continues above its last report
	// even if LastCounter were lost; never below the last one sent.
	p.counter = max(p.counter+1, uint64(time.Now().UnixNano()))
	return p.C.Anchor(ctx, p.BackendID, p.Domain, p.MasterKey, p.Lease, p.counter, gens)
}

// Claim takes an instance over (see Client.Claim).
func (p *Reporter) Claim(ctx context.Context, instance string, gen uint64) error {
	return p.C.Claim(ctx, p.BackendID, p.Domain, p.MasterKey, instance, gen)
}

// Claim moves an instance to this backend as it loads migrated state of
// generation gen. It waits (until ctx ends) while the owning backend has
// not confirmed that gen is its current state.
func (c *Client) Claim(ctx context.Context, backendID, domain string, masterKey []byte, instance string, gen uint64) error {
	mac, err := ClaimMAC(masterKey, backendID, domain, instance, gen)
	if err != nil {
		return err
	}
	for {
		resp, err := c.KB.Claim(ctx, &capb.ClaimRequest{BackendId: backendID, MigrationDomain: domain, Instance: instance, Generation: gen, Mac: mac})
		if err != nil {
			return fmt.Errorf("key broker: %w", err)
		}
		if !resp.GetPending() {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("key broker: the owning backend did not hand instance %s over: %w", instance, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}
