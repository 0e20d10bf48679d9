package keybroker

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"

	"bytes"
	"context"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hmac"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/internal/expiring"
)

// Broker is the key broker service.
type Broker struct {
	capb.UnimplementedKeyBrokerServer
	// Evidence gives the policy that decides which evidence earns keys and
	// the CSV verifier for its roots, as in force now: the CA's, which a
	// SIGHUP replaces (a measurement withdrawn there earns no more keys).
	Evidence func() (*csv.AppraisalPolicy, *csv.Verifier)
	// Signer is the CA key; backends trust its certificate.
	Signer crypto.Signer
	Store  Store
	// KEK (32 bytes) seals the keys in the store.
	KEK []byte
	Log *slog.Logger
	// NonceTTL bounds a challenge's life; zero means 5 minutes.
	NonceTTL time.Duration

	once   sync.Once
	nonces *expiring.Table[struct{}]
}

// Register adds the service to a gRPC server.
func (b *Broker) Register(g *grpc.Server) { capb.RegisterKeyBrokerServer(g, b) }

var validName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (b *Broker) log() *slog.Logger {
	if b.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return b.Log
}

// maxNonces bounds the outstanding challenges: beyond it new challenges
// are refused until old ones expire (an unauthenticated caller cannot
// grow the table without bound).
const maxNonces = 10000

func (b *Broker) table() *expiring.Table[struct{}] {
	b.once.Do(func() {
		ttl := b.NonceTTL
		if ttl == 0 {
			ttl = 5 * time.Minute
		}
		b.nonces = &expiring.Table[struct{}]{TTL: ttl, Max: maxNonces}
	})
	return b.nonces
}

func (b *Broker) KeyChallenge(ctx context.Context, _ *capb.KeyChallengeRequest) (*capb.KeyChallengeResponse, error) {
	nonce := make([]byte, 32)
	rand.Read(nonce)
	if err := b.table().Put(hex.EncodeToString(nonce), "", struct{}{}); err != nil {
		return nil, status.Error(codes.ResourceExhausted, err.Error())
	}
	return &capb.KeyChallengeResponse{Nonce: nonce}, nil
}

func (b *Broker) takeNonce(nonce []byte) error {
	_, ok, expired := b.table().Take(hex.EncodeToString(nonce))
	switch {
	case expired:
		return errors.New("the nonce expired")
	case !ok:
		return errors.New("the nonce was not issued by this broker or was already used")
	}
	return nil
}

// refuse logs and returns a refusal naming the reason.
func (b *Broker) refuse(backend, reason, detail string) error {
	b.log().Warn("key release refused", "backend", backend, "reason", reason, "detail", detail)
	return status.Errorf(codes.PermissionDenied, "key release refused: %s: %s", reason, detail)
}

func (b *Broker) ReleaseKeys(ctx context.Context, req *capb.ReleaseKeysRequest) (resp *capb.ReleaseKeysResponse, err error) {
	defer func() {
		if err == nil {
			releases.WithLabelValues("released", "").Inc()
		} else {
			releases.WithLabelValues("refused", status.Code(err).String()).Inc()
		}
	}()
	id, domain := req.GetBackendId(), req.GetMigrationDomain()
	if !validName.MatchString(id) || domain != "" && !validName.MatchString(domain) {
		return nil, status.Error(codes.InvalidArgument, "backend id and migration domain: 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
	}
	peer, err := ecdh.P256().NewPublicKey(req.GetEphemeralPublic())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "ephemeral public key: %v", err)
	}
	if c := req.GetCipher(); c != "aes-256-gcm" && c != "sm4-gcm" {
		return nil, status.Errorf(codes.InvalidArgument, "cipher %q: want aes-256-gcm or sm4-gcm", c)
	}
	if err := b.takeNonce(req.GetNonce()); err != nil {
		return nil, b.refuse(id, "nonce", err.Error())
	}
	rd := ReportData(req.GetNonce(), id, domain, req.GetEphemeralPublic(), req.GetCipher())
	policy, verifier := b.Evidence()
	claims, err := verifier.Verify(ctx, req.GetCsvReport(), rd[:])
	if err != nil {
		var ce *csv.CheckError
		if errors.As(err, &ce) && ce.Check == csv.CheckReportData {
			return nil, b.refuse(id, csv.ReasonReportData, "report_data does not commit to this nonce, backend, domain and ephemeral key")
		}
		return nil, b.refuse(id, csv.ReasonEvidence, err.Error())
	}
	if e := policy.Appraise(claims); e != nil {
		return nil, b.refuse(id, e.Reason, e.Detail)
	}
	// A backend id belongs to one migration domain: a host that restarts
	// it under another (or none) must not get its keys with an empty set
	// of anchors.
	if err := b.Store.BindDomain(ctx, id, domain); err != nil {
		if errors.Is(err, ErrOtherDomain) {
			return nil, b.refuse(id, "migration-domain", err.Error())
		}
		return nil, status.Error(codes.Internal, err.Error())
	}
	master, err := b.key(ctx, "backend/"+id, true)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	plain := master
	if domain != "" {
		mig, err := b.key(ctx, "domain/"+domain, true)
		if err != nil {
			return nil, status.Error(codes.Internal, err.Error())
		}
		plain = append(bytes.Clone(master), mig...)
	}
	defer clear(plain)
	anchors, moved, err := b.Store.Anchors(ctx, scope(id, domain), id)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	// This release is the backend's session from now on: reports of an
	// earlier one (another CVM running as this backend) are refused.
	lease := make([]byte, 16)
	rand.Read(lease)
	lastCounter, err := b.Store.NewSession(ctx, id, lease)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	eph, err := ecdh.P256().GenerateKey(rand.Reader)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	shared, err := eph.ECDH(peer)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "ECDH: %v", err)
	}
	aead, err := wrapAEAD(shared, req.GetNonce(), req.GetCipher())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	wrapped := aead.Seal(nil, zeroNonce, plain, rd[:])
	pub := eph.PublicKey().Bytes()
	sig, err := sign(b.Signer, Transcript(rd, pub, wrapped, anchors, moved, lease, lastCounter))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	b.log().Info("keys released", "backend", id, "migration_domain", domain, "measurement", hex.EncodeToString(claims.Measure[:]),
		"chip", claims.ChipSerial, "simulated", claims.Simulated, "anchors", len(anchors))
	return &capb.ReleaseKeysResponse{BrokerPublic: pub, Wrapped: wrapped, Anchors: anchors, Moved: moved, Signature: sig,
		Lease: lease, LastCounter: lastCounter}, nil
}

// ErrUnknownBackend: no keys were ever released to this backend.
var ErrUnknownBackend = errors.New("no keys were released to this backend")

// authenticate checks a request MAC under backend id's master key.
func (b *Broker) authenticate(ctx context.Context, id, domain string, mac func(master []byte) ([]byte, error), got []byte) error {
	if !validName.MatchString(id) || domain != "" && !validName.MatchString(domain) {
		return status.Error(codes.InvalidArgument, "backend id and migration domain: 1-64 of [A-Za-z0-9._-]")
	}
	master, err := b.key(ctx, "backend/"+id, false)
	if errors.Is(err, ErrUnknownBackend) {
		return status.Error(codes.PermissionDenied, err.Error())
	}
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	defer clear(master)
	want, err := mac(master)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if !hmac.Equal(want, got) {
		b.log().Warn("request refused: bad MAC", "backend", id)
		return status.Error(codes.PermissionDenied, "MAC does not verify (not from a backend holding this backend's keys)")
	}
	return nil
}

func (b *Broker) Anchor(ctx context.Context, req *capb.AnchorRequest) (*capb.AnchorResponse, error) {
	id, domain := req.GetBackendId(), req.GetMigrationDomain()
	if err := b.authenticate(ctx, id, domain, func(m []byte) ([]byte, error) {
		return AnchorMAC(m, id, domain, req.GetLease(), req.GetCounter(), req.GetGenerations())
	}, req.GetMac()); err != nil {
		return nil, err
	}
	if err := b.Store.Advance(ctx, id, req.GetLease(), req.GetCounter()); err != nil {
		switch {
		case errors.Is(err, ErrSuperseded):
			b.log().Warn("report from a superseded session of this backend (another CVM runs as it)", "backend", id)
			return nil, status.Error(codes.PermissionDenied, err.Error())
		case errors.Is(err, ErrReplay):
			b.log().Warn("replayed report refused", "backend", id, "err", err)
			return nil, status.Error(codes.FailedPrecondition, err.Error())
		}
		return nil, status.Error(codes.Internal, err.Error())
	}
	moved, err := b.Store.RaiseAnchors(ctx, scope(id, domain), id, req.GetGenerations())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	for inst, owner := range moved {
		b.log().Warn("anchor from a backend that no longer owns the instance (a stale copy after migration)", "backend", id, "instance", inst, "owner", owner)
	}
	return &capb.AnchorResponse{Moved: moved}, nil
}

func (b *Broker) Claim(ctx context.Context, req *capb.ClaimRequest) (*capb.ClaimResponse, error) {
	id, domain, inst, gen := req.GetBackendId(), req.GetMigrationDomain(), req.GetInstance(), req.GetGeneration()
	if err := b.authenticate(ctx, id, domain, func(m []byte) ([]byte, error) {
		return ClaimMAC(m, id, domain, inst, gen)
	}, req.GetMac()); err != nil {
		return nil, err
	}
	if !validName.MatchString(inst) {
		return nil, status.Error(codes.InvalidArgument, "instance id: 1-64 of [A-Za-z0-9._-]")
	}
	st, err := b.Store.Claim(ctx, scope(id, domain), id, inst, gen)
	switch {
	case errors.Is(err, ErrStale) || errors.Is(err, ErrDenied):
		b.log().Warn("migration claim refused (a replayed export?)", "backend", id, "instance", inst, "generation", gen, "reason", err)
		return nil, status.Errorf(codes.FailedPrecondition, "instance %s: %v", inst, err)
	case err != nil:
		return nil, status.Error(codes.Internal, err.Error())
	case st == ClaimPending:
		return &capb.ClaimResponse{Pending: true}, nil
	}
	b.log().Info("instance moved by migration", "backend", id, "instance", inst, "generation", gen)
	return &capb.ClaimResponse{}, nil
}

// key returns the key called name, creating it if create is set.
func (b *Broker) key(ctx context.Context, name string, create bool) ([]byte, error) {
	aead, err := b.kek()
	if err != nil {
		return nil, err
	}
	sealed, err := b.Store.SealedKey(ctx, name, func() ([]byte, error) {
		if !create {
			return nil, ErrUnknownBackend
		}
		k := make([]byte, KeySize)
		rand.Read(k)
		defer clear(k)
		n := make([]byte, aead.NonceSize())
		rand.Read(n)
		return aead.Seal(n, n, k, []byte(name)), nil
	})
	if err != nil {
		return nil, err
	}
	if len(sealed) < aead.NonceSize() {
		return nil, fmt.Errorf("key %s: sealed record truncated", name)
	}
	k, err := aead.Open(nil, sealed[:aead.NonceSize()], sealed[aead.NonceSize():], []byte(name))
	if err != nil {
		return nil, fmt.Errorf("key %s: does not open under the broker's KEK (tampered, or another broker's record)", name)
	}
	return k, nil
}

func (b *Broker) kek() (cipher.AEAD, error) {
	if len(b.KEK) != 32 {
		return nil, errors.New("key broker: KEK must be 32 bytes")
	}
	block, err := aes.NewCipher(b.KEK)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// releases counts key releases by decision and, for refusals, the gRPC
// status code.
var releases = promauto.NewCounterVec(prometheus.CounterOpts{
	Name: "cvtpm_keybroker_releases_total",
	Help: "Key broker releases of backend keys by decision (released, refused) and status code.",
}, []string{"decision", "code"})
