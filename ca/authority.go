package ca

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/emmansun/gmsm/sm3"
	"github.com/google/go-tpm/tpm2"

	"cvtpm/attest/csv"
	"cvtpm/enroll"
	"cvtpm/internal/expiring"
	"cvtpm/internal/logfield"
	"cvtpm/internal/serve"
)

// MaxInstanceID is the longest instance id the CA certifies.
const MaxInstanceID = 128

// Authority satisfies the enrollment protocol's view of a CA.
var _ enroll.CA = (*Authority)(nil)

// Authority is the CA's decision core: it hands out single-use challenge
// nonces, appraises enrollments (CSV evidence, binding, policy) and issues
// EK certificates. Every decision goes to the audit log with its reason.
type Authority struct {
	Policy   *Policy
	Verifier *csv.Verifier
	// One issuer per purpose (see Purpose): EK certificates, AK
	// certificates, link identities. A CA without one refuses that kind
	// of certificate; none ever signs for another.
	EKIssuer, AKIssuer, IdentityIssuer *Issuer
	TPM                                TPMInfo
	Audit                              Auditor
	Store                              Store         // issued and revoked certificates; nil keeps no records
	NonceTTL                           time.Duration // default 5 minutes
	Now                                func() time.Time
	// MaxOutstanding bounds the outstanding nonces and pending AK
	// challenges (each; default 500,000), MaxPerSource one client
	// address's share (default 50,000): beyond them a challenge is refused
	// with ErrBusy and nothing grows.
	MaxOutstanding, MaxPerSource int

	policyMu     sync.RWMutex     // guards Policy and Verifier against SetPolicy
	requestAudit logfield.Limiter // pre-appraisal refusals per source
	mu           sync.Mutex
	tablesOnce   sync.Once
	nonces       *expiring.Table[struct{}]
	enrolled     map[string][]byte // instance id + EK algorithm -> SHA-256 of the EK public area (store-less CA)
	pendingAKs   *expiring.Table[pendingAK]
}

// SetPolicy puts a new evidence policy in force (SIGHUP), with the CSV
// verifier for its roots; enrollments already under way finish under the
// policy they started with.
func (a *Authority) SetPolicy(p *Policy, v *csv.Verifier) {
	a.policyMu.Lock()
	defer a.policyMu.Unlock()
	a.Policy, a.Verifier = p, v
}

func (a *Authority) current() (*Policy, *csv.Verifier) {
	a.policyMu.RLock()
	defer a.policyMu.RUnlock()
	return a.Policy, a.Verifier
}

// EvidencePolicy is the CSV part of the policy in force and its verifier:
// what the key broker beside the CA judges backends by.
func (a *Authority) EvidencePolicy() (*csv.AppraisalPolicy, *csv.Verifier) {
	p, v := a.current()
	return &p.AppraisalPolicy, v
}

// ErrBadReason: a revocation reason RFC 5280 does not define.
var ErrBadReason = errors.New("not a CRLReason code")

// ValidCRLReason reports whether r is an RFC 5280 CRLReason: 0
// (unspecified) to 10 (aACompromise), 7 being unused.
func ValidCRLReason(r int) bool { return r >= 0 && r <= 10 && r != 7 }

// ErrBusy: too many outstanding challenges (in all, or from this source).
var ErrBusy = expiring.ErrFull

func (a *Authority) tables() {
	a.tablesOnce.Do(func() {
		max, per := a.MaxOutstanding, a.MaxPerSource
		if max <= 0 {
			max = 500_000
		}
		if per <= 0 {
			per = 50_000
		}
		a.nonces = &expiring.Table[struct{}]{TTL: a.nonceTTL(), Max: max, MaxPerSource: per, Now: a.now}
		a.pendingAKs = &expiring.Table[pendingAK]{TTL: a.nonceTTL(), Max: max, MaxPerSource: per, Now: a.now}
	})
}

// sourceOf is the client address of a call: each source gets its share
// of the outstanding challenges.
var sourceOf = serve.PeerSource

// Auditor records decisions; AuditFile is the durable one.
type Auditor interface {
	Record(ctx context.Context, e AuditEntry) error
}

// AuditEntry is one decision.
type AuditEntry struct {
	Time       time.Time `json:"time"`
	InstanceID string    `json:"instance_id"`
	Decision   string    `json:"decision"` // "issued" or "refused"
	Reason     string    `json:"reason,omitempty"`
	Detail     string    `json:"detail,omitempty"`
	Serial     string    `json:"serial,omitempty"`
	ChipSerial string    `json:"chip_serial,omitempty"`
	Measure    string    `json:"measure,omitempty"`
}

func (a *Authority) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

// Roots are the certificates EK certificates chain to.
func (a *Authority) Roots(context.Context) ([][]byte, error) {
	der, err := a.Root(PurposeEK)
	if err != nil {
		return nil, err
	}
	return [][]byte{der}, nil
}

// Challenge returns a fresh nonce the next enrollment must commit to; it
// is valid once, for NonceTTL.
func (a *Authority) Challenge(ctx context.Context) ([]byte, error) {
	nonce := make([]byte, 32)
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("drawing a nonce: %w", err)
	}
	a.tables()
	if err := a.nonces.Put(hex.EncodeToString(nonce), sourceOf(ctx), struct{}{}); err != nil {
		return nil, err
	}
	return nonce, nil
}

func (a *Authority) nonceTTL() time.Duration {
	if a.NonceTTL <= 0 {
		return 5 * time.Minute
	}
	return a.NonceTTL
}

// takeNonce consumes a nonce: it is valid once, until it expires.
func (a *Authority) takeNonce(nonce []byte) *Refusal {
	a.tables()
	_, ok, expired := a.nonces.Take(hex.EncodeToString(nonce))
	switch {
	case expired:
		return refuse(ReasonNonceExpired, "the nonce expired")
	case !ok:
		return refuse(ReasonNonce, "the nonce was not issued by this CA or was already used")
	}
	return nil
}

// Enroll appraises req and issues the EK certificate, or returns a
// *Refusal naming the reason. Both outcomes are audited.
func (a *Authority) Enroll(ctx context.Context, req enroll.Request) (*x509.Certificate, error) {
	entry := AuditEntry{Time: a.now().UTC(), InstanceID: req.InstanceID}
	cert, claims, err := a.enroll(ctx, req)
	if claims != nil {
		entry.ChipSerial, entry.Measure = claims.ChipSerial, hex.EncodeToString(claims.Measure)
	}
	var r *Refusal
	switch {
	case err == nil:
		entry.Decision, entry.Serial = "issued", cert.SerialNumber.Text(16)
	case errors.As(err, &r):
		entry.Decision, entry.Reason, entry.Detail = "refused", r.Reason, r.Detail
	default:
		entry.Decision, entry.Reason, entry.Detail = "refused", ReasonInternalFailed, err.Error()
	}
	if aerr := a.audit(ctx, "enroll", entry); aerr != nil {
		// An unaudited issuance must not leave the CA.
		return nil, fmt.Errorf("recording the decision: %w", aerr)
	}
	return cert, err
}

func (a *Authority) enroll(ctx context.Context, req enroll.Request) (*x509.Certificate, *csv.Claims, error) {
	if a.EKIssuer == nil {
		return nil, nil, errors.New("this CA has no EK issuer")
	}
	if req.InstanceID == "" || len(req.Nonce) == 0 || len(req.Report) == 0 {
		return nil, nil, refuse(ReasonBadRequest, "instance id, nonce and report are required")
	}
	if len(req.InstanceID) > MaxInstanceID {
		return nil, nil, refuse(ReasonBadRequest, fmt.Sprintf("instance id of %d bytes (at most %d)", len(req.InstanceID), MaxInstanceID))
	}
	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](req.EKPublicArea)
	if err != nil {
		return nil, nil, refuse(ReasonBadRequest, "EK public area: "+err.Error())
	}
	ek, err := tpm2.Pub(*ekPub)
	if err != nil {
		return nil, nil, refuse(ReasonBadRequest, "EK public key: "+err.Error())
	}
	// Only a key made from a TCG EK template (fixedTPM, restricted
	// decrypt, the endorsement policy) gets an EK certificate.
	if err := enroll.CheckEKTemplate(req.EKPublicArea); err != nil {
		return nil, nil, refuse(ReasonBadRequest, "not an EK: "+err.Error())
	}
	if r := a.takeNonce(req.Nonce); r != nil {
		return nil, nil, r
	}
	want := enroll.ReportData(req.Nonce, req.EKPublicArea, req.InstanceID)
	policy, verifier := a.current()
	claims, err := verifier.Verify(ctx, req.Report, want[:])
	if err != nil {
		var ce *csv.CheckError
		switch {
		case errors.As(err, &ce) && ce.Check == csv.CheckReportData:
			return nil, nil, refuse(ReasonReportData, "report_data does not commit to this nonce, EK and instance")
		case errors.As(err, &ce) && (ce.Check == csv.CheckHSK || ce.Check == csv.CheckRoot):
			return nil, nil, refuse(ReasonUntrustedRoot, err.Error())
		default:
			return nil, nil, refuse(ReasonEvidence, err.Error())
		}
	}
	if r := policy.appraise(claims); r != nil {
		return nil, claims, r
	}
	ekDigest := sha256.Sum256(req.EKPublicArea)
	// An instance has one EK per algorithm (RSA and ECC); the rule
	// applies to each.
	slot := fmt.Sprintf("%s/%d", req.InstanceID, ekPub.Type)
	if err := a.recordEnrollment(ctx, slot, ekDigest[:], policy.Reenroll); err != nil {
		if errors.Is(err, ErrReenroll) {
			return nil, claims, refuse(ReasonReenroll, "instance "+req.InstanceID+": "+strings.TrimPrefix(err.Error(), ErrReenroll.Error()+": "))
		}
		return nil, claims, fmt.Errorf("recording the enrollment: %w", err)
	}
	chipDigest := sm3.Sum([]byte(claims.ChipSerial))
	reportDigest := sha256.Sum256(req.Report)
	tmpl, err := ekTemplate(EKCertificateRequest{
		EK:  ek,
		TPM: a.TPM,
		Claims: &CSVClaims{
			Measurement: claims.Measure, Policy: claims.Policy.Raw, ChipIDDigest: chipDigest[:],
			RootFingerprint: claims.Root.Fingerprint, ReportDigest: reportDigest[:], Simulated: claims.Simulated,
		},
	}, a.EKIssuer.SubjectKeyID())
	if err != nil {
		return nil, claims, err
	}
	cert, err := a.EKIssuer.Sign(tmpl, ek)
	if err != nil {
		return nil, claims, fmt.Errorf("signing the EK certificate: %w", err)
	}
	if a.Store != nil {
		rec := IssuedCert{Serial: cert.SerialNumber.Text(16), InstanceID: req.InstanceID, DER: cert.Raw, Issued: a.now().UTC()}
		if err := a.Store.PutIssued(ctx, rec); err != nil {
			return nil, claims, fmt.Errorf("recording the certificate: %w", err)
		}
	}
	return cert, claims, nil
}

// recordEnrollment applies the re-enrollment rule in the store (one
// transaction: a restart or another replica sees it), or in memory for a
// CA without a store.
func (a *Authority) recordEnrollment(ctx context.Context, slot string, ekDigest []byte, rule string) error {
	if r, ok := a.Store.(EnrollmentRecorder); ok {
		return r.RecordEnrollment(ctx, slot, ekDigest, rule)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	prev, seen := a.enrolled[slot]
	if err := applyReenroll(prev, seen, ekDigest, rule); err != nil {
		return err
	}
	if a.enrolled == nil {
		a.enrolled = map[string][]byte{}
	}
	a.enrolled[slot] = ekDigest
	return nil
}

// Revoke revokes an issued certificate (serial in hex) with an RFC 5280
// reason code; the next CRL lists it. The decision is audited.
func (a *Authority) Revoke(ctx context.Context, serial string, reason int) error {
	if !ValidCRLReason(reason) {
		return fmt.Errorf("%w: %d (RFC 5280: 0-10, not 7)", ErrBadReason, reason)
	}
	if a.Store == nil {
		return errors.New("this CA keeps no certificate store")
	}
	rec, err := a.Store.Issued(ctx, serial)
	if err != nil {
		return err
	}
	if err := a.Store.Revoke(ctx, serial, a.now(), reason); err != nil {
		return fmt.Errorf("revoking %s: %w", serial, err)
	}
	entry := AuditEntry{Time: a.now().UTC(), InstanceID: rec.InstanceID, Decision: "revoked",
		Serial: serial, Reason: fmt.Sprintf("crl-reason-%d", reason)}
	countDecision("revoke", entry)
	return a.Audit.Record(ctx, entry)
}

// AuditFile appends decisions as JSON lines to a file, synced before
// Record returns, so the log survives crashes and restarts. Concurrent
// Records share fsyncs (group commit): one sync covers every line written
// before it started.
type AuditFile struct {
	mu      sync.Mutex // guards f writes and written
	f       *os.File
	written uint64
	syncMu  sync.Mutex // serialises syncs; guards synced
	synced  uint64
}

// OpenAuditFile opens (creating) an append-only audit log.
func OpenAuditFile(path string) (*AuditFile, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	return &AuditFile{f: f}, nil
}

// Record appends one entry durably.
func (l *AuditFile) Record(_ context.Context, e AuditEntry) error {
	// What a client sent is clipped: every decision is recorded, but an
	// unauthenticated client cannot fill the disk through it.
	e.InstanceID, e.Detail, e.ChipSerial = logfield.Clip(e.InstanceID), logfield.Clip(e.Detail), logfield.Clip(e.ChipSerial)
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	l.mu.Lock()
	_, err = l.f.Write(append(b, '\n'))
	l.written++
	mine := l.written
	l.mu.Unlock()
	if err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	l.syncMu.Lock()
	defer l.syncMu.Unlock()
	if l.synced >= mine {
		return nil // a sync that started after our write already covered it
	}
	l.mu.Lock()
	upto := l.written
	l.mu.Unlock()
	if err := l.f.Sync(); err != nil {
		return fmt.Errorf("audit log: %w", err)
	}
	l.synced = upto
	return nil
}

// Close closes the log.
func (l *AuditFile) Close() error { return l.f.Close() }

// ReadAudit returns every entry of an audit log file.
func ReadAudit(path string) ([]AuditEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("audit log: %w", err)
	}
	var out []AuditEntry
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var e AuditEntry
		if err := json.Unmarshal(line, &e); err != nil {
			return nil, fmt.Errorf("audit log: malformed line: %w", err)
		}
		out = append(out, e)
	}
	return out, nil
}
