package verifier

import (
	"bytes"
	"cmp"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/emmansun/gmsm/sm3"
	tpmtoolspb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	legacy "github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpm2"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/certprofile"
	"cvtpm/attest/csv"
	"cvtpm/attest/freshreport"
	"cvtpm/attest/workload"
	"cvtpm/internal/expiring"
	"cvtpm/internal/pkisig"
	"cvtpm/internal/serve"
)

// CRLSource supplies one issuer's current CRL.
type CRLSource = pkisig.CRLSource

// Options configure a Verifier.
type Options struct {
	// EKRoots must have signed the EK certificate, AKRoots the AK
	// certificate (the cvtpm CA's ca.pem and ak-ca.pem: one root per
	// purpose, so neither kind, nor a link identity, passes for the
	// other; further certificates in Evidence.ek_chain are not used).
	// Both required. DER, because an SM2 CA's root (ca --key-type sm2)
	// is beyond crypto/x509; such roots work for everything but the CRL
	// check.
	EKRoots, AKRoots [][]byte
	// CRLs, if set, are the issuers' revocation lists: the EK and the AK
	// certificate are each looked up in the CRL of their issuer. A
	// certificate whose issuer has no (current, signed) CRL among them
	// fails the appraisal.
	CRLs []CRLSource
	// CSV is the platform policy: trusted HYGON roots, approved
	// measurements, policy bits. Required.
	CSV *csv.AppraisalPolicy
	// Workload is the policy for the workload leg (the workload VM's own
	// CSV report: trusted roots, approved launch measurements, policy
	// bits); nil appraises no workload report (one present is then
	// refused as not appraised). RequireWorkload makes a missing workload
	// report a refusal.
	Workload        *csv.AppraisalPolicy
	RequireWorkload bool
	// CSVCerts supplies HSK/CEK by chip serial; nil uses the pair sent
	// with the evidence (it must still chain to a trusted root).
	CSVCerts csv.CertSource
	// Policy is a Rego module in package cvtpm defining "result"; empty
	// uses the built-in default (default.rego).
	Policy string
	// Reference is the policy's data.reference (e.g. expected PCRs).
	Reference map[string]any
	// Signer signs EAR tokens (ECDSA P-256: ES256). Required.
	Signer crypto.Signer
	// NonceTTL bounds how long a challenge is valid; zero means 5 minutes.
	NonceTTL time.Duration
	// Nonces issues and retires nonces; nil keeps them in memory (one
	// verifier process). Replicas behind a load balancer share a store.
	Nonces NonceStore
	Now    func() time.Time
}

// NonceStore issues single-use nonces and retires them when used.
type NonceStore interface {
	Issue(ctx context.Context, nonce []byte, expires time.Time) error
	// Consume retires nonce; ok is false with a reason
	// ("nonce-unknown-or-used", "nonce-expired") if it may not be used.
	Consume(ctx context.Context, nonce []byte, now time.Time) (ok bool, reason string)
}

// NewMemoryNonces is the in-process NonceStore New uses when Options has
// none (made here to be shared by a verifier and its replacement).
func NewMemoryNonces(ttl time.Duration) NonceStore {
	if ttl == 0 {
		ttl = 5 * time.Minute
	}
	return &memoryNonces{ttl: ttl, now: time.Now}
}

// memoryNonces is the in-process NonceStore: an expiry queue (no sweep),
// at most 500,000 outstanding and 50,000 per client address, beyond which
// Issue fails with ErrBusy.
type memoryNonces struct {
	once  sync.Once
	ttl   time.Duration
	now   func() time.Time
	table *expiring.Table[struct{}]
}

// ErrBusy: too many outstanding challenges (in all, or from this source).
var ErrBusy = expiring.ErrFull

func (m *memoryNonces) t() *expiring.Table[struct{}] {
	m.once.Do(func() {
		m.table = &expiring.Table[struct{}]{TTL: m.ttl, Max: 500_000, MaxPerSource: 50_000, Now: m.now}
	})
	return m.table
}

func (m *memoryNonces) Issue(ctx context.Context, nonce []byte, _ time.Time) error {
	return m.t().Put(string(nonce), sourceOf(ctx), struct{}{})
}

func (m *memoryNonces) Consume(_ context.Context, nonce []byte, _ time.Time) (bool, string) {
	_, ok, expired := m.t().Take(string(nonce))
	switch {
	case expired:
		return false, "nonce-expired"
	case !ok:
		return false, "nonce-unknown-or-used"
	}
	return true, ""
}

// sourceOf is the client address of a call: each source gets its share
// of the outstanding challenges.
var sourceOf = serve.PeerSource

// Verifier checks evidence and issues EAR tokens. It is safe for
// concurrent use.
type Verifier struct {
	opts   Options
	policy appraiser
	// crlIssuers are the CA roots crypto/x509 can parse, for checking CRL
	// signatures (SM2 roots are beyond it).
	crlIssuers []*x509.Certificate
	csv        *csv.Verifier // one, so its chain caches serve every request
	// workloadCSV checks workload reports against the workload policy's
	// roots.
	workloadCSV *csv.Verifier

	mu       sync.Mutex
	trustOK  map[[32]byte]bool // SHA-256 of certificates found signed by a CA root
	parsed   map[[32]byte]any  // SHA-256 of DER -> *x509.Certificate
	ekMatch  map[[32]byte]any  // SHA-256(EK public area || EK certificate) -> true
	crlOK    map[[32]byte]any  // SHA-256 of CRL || root found signing it -> true
	issuer   map[[32]byte]any  // SHA-256 of a certificate -> the root (of crlIssuers) that signed it
	crlFloor pkisig.CRLFloor   // the newest CRL number seen per issuer
}

// New returns a Verifier.
func New(ctx context.Context, opts Options) (*Verifier, error) {
	if len(opts.EKRoots) == 0 || len(opts.AKRoots) == 0 || opts.CSV == nil || opts.Signer == nil {
		return nil, errors.New("verifier: EKRoots, AKRoots, CSV policy and Signer are required")
	}
	// With the HSK+CEK the evidence carries, the chip serial is the
	// evidence's own claim: chip lists would be bypassed.
	if opts.CSVCerts == nil && (len(opts.CSV.AllowChips) > 0 || len(opts.CSV.DenyChips) > 0 ||
		opts.Workload != nil && (len(opts.Workload.AllowChips) > 0 || len(opts.Workload.DenyChips) > 0)) {
		return nil, fmt.Errorf("verifier: %w", csv.ErrEvidenceCertsWithChipLists)
	}
	if opts.RequireWorkload && opts.Workload == nil {
		return nil, errors.New("verifier: RequireWorkload needs a Workload policy")
	}
	if opts.NonceTTL == 0 {
		opts.NonceTTL = 5 * time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	p, err := newAppraiser(ctx, opts.Policy, opts.Reference)
	if err != nil {
		return nil, err
	}
	if opts.Nonces == nil {
		opts.Nonces = &memoryNonces{ttl: opts.NonceTTL, now: opts.Now}
	}
	v := &Verifier{opts: opts, policy: p, trustOK: map[[32]byte]bool{}, parsed: map[[32]byte]any{}, ekMatch: map[[32]byte]any{},
		crlOK: map[[32]byte]any{}, issuer: map[[32]byte]any{}}
	for _, der := range append(slices.Clone(opts.EKRoots), opts.AKRoots...) {
		if root, err := x509.ParseCertificate(der); err == nil {
			v.crlIssuers = append(v.crlIssuers, root)
		}
	}
	v.csv = csv.NewVerifier(csv.VerifierOptions{TrustedRoots: opts.CSV.TrustedRoots(), Certs: evidenceCerts{fallback: opts.CSVCerts}})
	if opts.Workload != nil {
		v.workloadCSV = csv.NewVerifier(csv.VerifierOptions{TrustedRoots: opts.Workload.TrustedRoots(), Certs: evidenceCerts{fallback: opts.CSVCerts}})
	}
	return v, nil
}

// Challenge returns a fresh 32-byte nonce, valid once until the returned
// time.
func (v *Verifier) Challenge(ctx context.Context) ([]byte, time.Time, error) {
	n := make([]byte, 32)
	if _, err := rand.Read(n); err != nil {
		return nil, time.Time{}, err
	}
	exp := v.opts.Now().Add(v.opts.NonceTTL)
	if err := v.opts.Nonces.Issue(ctx, n, exp); err != nil {
		return nil, time.Time{}, err
	}
	return n, exp, nil
}

// Facts are what the verifier established, the Rego policy's input.
type Facts struct {
	Nonce struct {
		OK     bool   `json:"ok"`
		Reason string `json:"reason,omitempty"`
	} `json:"nonce"`
	TPM struct {
		EKTrusted   bool              `json:"ek_trusted"`
		EKReason    string            `json:"ek_reason,omitempty"`
		EKRevoked   bool              `json:"ek_revoked"`
		EKSerial    string            `json:"ek_serial,omitempty"`
		AKBound     bool              `json:"ak_bound"`
		AKReason    string            `json:"ak_reason,omitempty"`
		QuoteOK     bool              `json:"quote_ok"`
		QuoteReason string            `json:"quote_reason,omitempty"`
		PCRs        map[string]string `json:"pcrs,omitempty"` // SHA-256 bank: index -> hex, from the verified quote
		Detail      string            `json:"detail,omitempty"`
	} `json:"tpm"`
	CSV struct {
		ReportOK        bool   `json:"report_ok"`
		Reason          string `json:"reason,omitempty"`
		Detail          string `json:"detail,omitempty"`
		Simulated       bool   `json:"simulated"`
		MatchesEKClaims bool   `json:"matches_ek_claims"`
		// EKClaimsReason says why a verified report does not match the EK
		// certificate's CSV claims.
		EKClaimsReason string `json:"ek_claims_reason,omitempty"`
		Measurement    string `json:"measurement,omitempty"`
		ChipSerial     string `json:"chip_serial,omitempty"`
		Instance       string `json:"instance,omitempty"`
	} `json:"csv"`
	// Workload is the workload leg: the workload VM's own CSV report.
	Workload struct {
		Present  bool   `json:"present"`
		Required bool   `json:"required"`
		ReportOK bool   `json:"report_ok"`
		Reason   string `json:"reason,omitempty"`
		Detail   string `json:"detail,omitempty"`
		// From the verified report.
		Simulated   bool   `json:"simulated"`
		Measurement string `json:"measurement,omitempty"`
		ChipSerial  string `json:"chip_serial,omitempty"`
		Policy      uint32 `json:"policy"`
	} `json:"workload"`
}

// Result is an appraisal: the signed token and what it says.
type Result struct {
	Token   string
	Submods map[string]Submod
	Facts   *Facts
}

// Submod is one EAR submodule's verdict.
type Submod struct {
	Status  string   `json:"ear.status"`
	Reasons []string `json:"cvtpm.reasons,omitempty"`
}

// Affirming reports whether every submodule is affirming, or at worst
// warning (e.g. simulated CSV evidence that the policy trusts).
func (r *Result) Affirming() bool {
	for _, s := range r.Submods {
		if s.Status != StatusAffirming && s.Status != StatusWarning {
			return false
		}
	}
	return len(r.Submods) > 0
}

// Verify appraises evidence for nonce and returns the signed result. A
// refusal is a Result too (contraindicated, with reasons); an error means
// no result could be produced at all.
func (v *Verifier) Verify(ctx context.Context, nonce []byte, ev *attestpb.Evidence) (*Result, error) {
	f := &Facts{}
	f.Nonce.OK, f.Nonce.Reason = v.opts.Nonces.Consume(ctx, nonce, v.opts.Now())
	ekCert := v.checkTPM(ctx, nonce, ev, f)
	v.checkCSV(ctx, nonce, ev, ekCert, f)
	v.checkWorkload(ctx, nonce, ev, f)
	submods, err := v.policy.eval(ctx, f)
	if err != nil {
		return nil, err
	}
	enforceVerifiedFacts(submods, f)
	countVerdicts(submods)
	token, err := v.sign(nonce, submods, f, ev)
	if err != nil {
		return nil, err
	}
	return &Result{Token: token, Submods: submods, Facts: f}, nil
}

// enforceVerifiedFacts makes the checks done in Go binding whatever the
// Rego policy says: a policy (the built-in one or --rego) judges
// measurements and reference values and may add refusals, but it cannot
// affirm a used nonce, an untrusted or revoked EK, an unbound AK, a quote
// or report that failed verification, or a workload leg that is missing
// when required (--require-workload) or present and unverified.
func enforceVerifiedFacts(submods map[string]Submod, f *Facts) {
	refuse := func(leg, reason string) {
		s := submods[leg]
		s.Status = StatusContraindicated
		if !slices.Contains(s.Reasons, reason) {
			s.Reasons = append(s.Reasons, reason)
		}
		submods[leg] = s
	}
	if !f.Nonce.OK {
		for _, leg := range []string{"cvtpm-vtpm", "csv-platform"} {
			refuse(leg, f.Nonce.Reason)
		}
	}
	t := &f.TPM
	for _, c := range []struct {
		ok     bool
		reason string
	}{{t.EKTrusted, t.EKReason}, {!t.EKRevoked, "ek-certificate-revoked"}, {t.AKBound, t.AKReason}, {t.QuoteOK, t.QuoteReason}} {
		if !c.ok {
			refuse("cvtpm-vtpm", cmp.Or(c.reason, "tpm-evidence-not-verified"))
		}
	}
	if !f.CSV.ReportOK {
		refuse("csv-platform", cmp.Or(f.CSV.Reason, "csv-report-not-verified"))
	}
	if w := &f.Workload; (w.Required || w.Present) && !w.ReportOK {
		refuse("csv-workload", cmp.Or(w.Reason, "workload-report-not-verified"))
	}
}

// trusted reports whether one of roots signed c. Positive answers are
// cached by the certificate's and root set's digest: an instance's EK and
// AK certificates come back with every attestation.
func (v *Verifier) trusted(c *x509.Certificate, roots [][]byte) bool {
	h := sha256.New()
	h.Write(c.Raw)
	for _, r := range roots {
		h.Write(r)
	}
	var key [32]byte
	h.Sum(key[:0])
	v.mu.Lock()
	ok := v.trustOK[key]
	v.mu.Unlock()
	if ok {
		return true
	}
	for _, root := range roots {
		if pkisig.SignedBy(c.Raw, root) == nil {
			v.mu.Lock()
			if len(v.trustOK) > 1<<16 {
				clear(v.trustOK)
			}
			v.trustOK[key] = true
			v.mu.Unlock()
			v.remember(v.parsed, sha256.Sum256(c.Raw), c)
			return true
		}
	}
	return false
}

// evidenceCerts is the CSV verifier's certificate source: the HSK/CEK sent
// with the evidence being verified (carried in the context), else the
// configured source. The pair must chain to a trusted root either way.
type evidenceCerts struct{ fallback csv.CertSource }

type hskCEKKey struct{}

type hskCEK struct {
	hsk *csv.CACert
	cek *csv.CSVCert
}

func (e evidenceCerts) HSKCEK(ctx context.Context, chip string) (*csv.CACert, *csv.CSVCert, error) {
	if p, ok := ctx.Value(hskCEKKey{}).(hskCEK); ok {
		return p.hsk, p.cek, nil
	}
	if e.fallback == nil {
		return nil, nil, errors.New("the evidence carries no HSK/CEK and no certificate source is configured")
	}
	return e.fallback.HSKCEK(ctx, chip)
}

// checkTPM establishes the vTPM facts and returns the EK certificate if it
// could be parsed.
func (v *Verifier) checkTPM(ctx context.Context, nonce []byte, ev *attestpb.Evidence, f *Facts) *x509.Certificate {
	t := &f.TPM
	now := v.opts.Now()
	var ekCert *x509.Certificate
	if len(ev.GetEkChain()) == 0 {
		t.EKReason = "ek-certificate-missing"
	} else if c, err := v.parseCert(ev.GetEkChain()[0]); err != nil {
		t.EKReason, t.Detail = "ek-certificate-malformed", err.Error()
	} else {
		ekCert = c
		t.EKSerial = c.SerialNumber.Text(16)
		// Go's x509.Verify refuses TCG EK certificates (their critical SAN
		// holds only a directoryName), so the signature is checked directly.
		switch {
		case !v.trusted(c, v.opts.EKRoots):
			t.EKReason = "ek-certificate-untrusted"
		case now.Before(c.NotBefore) || now.After(c.NotAfter):
			t.EKReason = "ek-certificate-expired"
		case certprofile.CheckEK(c) != nil:
			// A link identity or an AK certificate from the same CA
			// names a key that need not be in a TPM.
			t.EKReason, t.Detail = "ek-certificate-not-ek-profile", certprofile.CheckEK(c).Error()
		default:
			t.EKTrusted = true
		}
		if t.EKTrusted && len(v.opts.CRLs) > 0 {
			revoked, err := v.revoked(ctx, c)
			if err != nil {
				t.EKTrusted, t.EKReason, t.Detail = false, "crl-unavailable", err.Error()
			}
			t.EKRevoked = revoked
		}
	}

	att := &tpmtoolspb.Attestation{}
	if err := proto.Unmarshal(ev.GetTpmAttestation(), att); err != nil {
		t.AKReason, t.QuoteReason, t.Detail = "tpm-attestation-malformed", "tpm-attestation-malformed", err.Error()
		return ekCert
	}
	akCert, err := v.parseCert(att.GetAkCert())
	switch {
	case err != nil:
		t.AKReason = "ak-certificate-missing-or-malformed"
	case !v.trusted(akCert, v.opts.AKRoots):
		t.AKReason = "ak-certificate-untrusted"
	case now.Before(akCert.NotBefore) || now.After(akCert.NotAfter):
		t.AKReason = "ak-certificate-expired"
	case certprofile.CheckAK(akCert) != nil:
		t.AKReason = "ak-certificate-not-ak-profile"
	case ekCert == nil || !certifiesEK(akCert, ekCert):
		t.AKReason = "ak-not-bound-to-ek"
	default:
		t.AKBound = true
	}
	if t.AKBound && len(v.opts.CRLs) > 0 {
		if revoked, err := v.revoked(ctx, akCert); err != nil {
			t.AKBound, t.AKReason, t.Detail = false, "crl-unavailable", err.Error()
		} else if revoked {
			t.AKBound, t.AKReason = false, "ak-certificate-revoked"
		}
	}
	if akCert == nil {
		t.QuoteReason = "ak-certificate-missing-or-malformed"
		return ekCert
	}
	// Quotes, nonce, PCR digests and event log replay: go-tpm-tools, with
	// the AK from the CA-issued certificate as the only trusted AK.
	if _, err := server.VerifyAttestation(att, server.VerifyOpts{
		Nonce: nonce, TrustedAKs: []crypto.PublicKey{akCert.PublicKey}, HashAlgo: legacy.AlgSHA256,
		Loader: server.UnsupportedLoader,
		// OVMF's direct kernel boot measures the kernel as an
		// EFI application before the "Calling EFI Application" event: a
		// genuine log that replays exactly, not a forgery.
		AllowEFIAppBeforeCallingEvent: true,
	}); err != nil {
		t.QuoteReason, t.Detail = quoteReason(err), err.Error()
		return ekCert
	}
	t.QuoteOK = true
	t.PCRs = map[string]string{}
	for i, d := range verifiedQuote(att).GetPcrs().GetPcrs() {
		t.PCRs[fmt.Sprint(i)] = hex.EncodeToString(d)
	}
	return ekCert
}

// verifiedQuote is the quote whose signature, nonce and PCR digest
// server.VerifyAttestation checked and against which it replayed the event
// log: the first SHA-256 quote. Other quotes (the SHA-1 bank, or further
// SHA-256 quotes) were not checked, so no PCR value may come from them.
func verifiedQuote(att *tpmtoolspb.Attestation) *tpmpb.Quote {
	for _, q := range att.GetQuotes() {
		if q.GetPcrs().GetHash() == tpmpb.HashAlgo_SHA256 {
			return q
		}
	}
	return nil
}

// quoteReason names what go-tpm-tools refused; the error itself goes to
// the facts' detail.
func quoteReason(err error) string {
	s := strings.ToLower(err.Error())
	switch {
	case strings.Contains(s, "nonce"):
		return "quote-nonce-mismatch"
	case strings.Contains(s, "replay"):
		return "eventlog-does-not-match-pcrs"
	case strings.Contains(s, "event log") || strings.Contains(s, "eventlog"):
		// It replays (or was not reached) but its events break the
		// rules of a PC Client log: say so, not "does not match".
		return "eventlog-malformed"
	case strings.Contains(s, "digest") || strings.Contains(s, "pcr"):
		return "pcrs-do-not-match-quote"
	case strings.Contains(s, "trusted") || strings.Contains(s, "ak"):
		return "quote-not-signed-by-certified-ak"
	}
	return "quote-invalid"
}

// certifiesEK reports whether the AK certificate names this EK certificate
// (certprofile.OIDCVTPMCertifiedEK).
func certifiesEK(ak, ek *x509.Certificate) bool {
	want := sha256.Sum256(ek.Raw)
	for _, e := range ak.Extensions {
		if e.Id.Equal(certprofile.OIDCVTPMCertifiedEK) {
			var got []byte
			if rest, err := asn1.Unmarshal(e.Value, &got); err == nil && len(rest) == 0 {
				return bytes.Equal(got, want[:])
			}
		}
	}
	return false
}

func (v *Verifier) revoked(ctx context.Context, c *x509.Certificate) (bool, error) {
	// The list must be signed by the root that signed c (a root of the
	// same name from another CA does not count), and be no older than
	// one of that root already seen.
	// Which root signed c is looked up once per certificate: the same EK
	// and AK certificates come back with every attestation.
	certKey := sha256.Sum256(c.Raw)
	root, _ := v.cached(v.issuer, certKey).(*x509.Certificate)
	for _, r := range v.crlIssuers {
		if root != nil {
			break
		}
		if c.CheckSignatureFrom(r) == nil {
			root = r
			v.remember(v.issuer, certKey, r)
		}
	}
	if root == nil {
		return false, fmt.Errorf("the root that issued %q cannot check CRLs (SM2 roots are beyond crypto/x509)", c.Issuer.CommonName)
	}
	var lastErr error
	for _, src := range v.opts.CRLs {
		crl, err := src.CRL(ctx)
		if err != nil {
			lastErr = err
			continue
		}
		if crl == nil || !bytes.Equal(crl.RawIssuer, c.RawIssuer) {
			continue
		}
		key := sha256.Sum256(append(slices.Clone(crl.Raw), root.Raw...))
		if v.cached(v.crlOK, key) == nil {
			if crl.CheckSignatureFrom(root) != nil {
				lastErr = fmt.Errorf("a CRL named %q is not signed by the root that issued the certificate", c.Issuer.CommonName)
				continue
			}
			v.remember(v.crlOK, key, true)
		}
		if err := v.crlFloor.Check(crl); err != nil {
			return false, err
		}
		// A CRL past its NextUpdate may be an old copy replayed to hide
		// a revocation.
		if now := v.opts.Now(); !crl.NextUpdate.IsZero() && now.After(crl.NextUpdate) {
			return false, fmt.Errorf("the CRL of %q expired at %s", c.Issuer.CommonName, crl.NextUpdate.UTC().Format(time.RFC3339))
		}
		for _, r := range crl.RevokedCertificateEntries {
			if r.SerialNumber.Cmp(c.SerialNumber) == 0 {
				return true, nil
			}
		}
		return false, nil
	}
	if lastErr != nil {
		return false, lastErr
	}
	return false, fmt.Errorf("no CRL of the issuer %q is configured", c.Issuer.CommonName)
}

// checkCSV establishes the platform facts: a report for this nonce, EK and
// instance, chaining to a trusted root, meeting the CSV policy, from the
// chip and image that the EK certificate's claims record.
func (v *Verifier) checkCSV(ctx context.Context, nonce []byte, ev *attestpb.Evidence, ekCert *x509.Certificate, f *Facts) {
	c := &f.CSV
	c.Instance = ev.GetInstanceId()
	if ekCert != nil {
		if !v.ekPublicMatches(ev.GetEkPublic(), ekCert) {
			c.Reason = "csv-report-for-another-ek"
			return
		}
	}
	if v.opts.CSVCerts == nil {
		hsk, cek, err := csv.ParseHSKCEK(ev.GetCsvHskCek())
		if err != nil {
			c.Reason, c.Detail = csv.ReasonEvidence, "HSK/CEK: "+err.Error()
			return
		}
		ctx = context.WithValue(ctx, hskCEKKey{}, hskCEK{hsk, cek})
	}
	want := freshreport.ReportData(nonce, ev.GetEkPublic(), ev.GetInstanceId())
	claims, err := v.opts.CSV.VerifyAndAppraise(ctx, v.csv, ev.GetCsvReport(), want[:])
	if claims != nil {
		c.Simulated, c.Measurement, c.ChipSerial = claims.Simulated, hex.EncodeToString(claims.Measure), claims.ChipSerial
	}
	if err != nil {
		var ae *csv.AppraisalError
		if errors.As(err, &ae) {
			c.Reason, c.Detail = ae.Reason, ae.Detail
			if ae.Reason == csv.ReasonReportData {
				// Another nonce, EK or instance than this evidence names.
				c.Reason = "csv-report-not-bound-to-this-nonce-ek-and-instance"
			}
		} else {
			c.Reason, c.Detail = csv.ReasonEvidence, err.Error()
		}
		return
	}
	c.ReportOK = true
	if ekCert == nil {
		c.EKClaimsReason = "ek-certificate-missing-or-malformed"
		return
	}
	c.EKClaimsReason = ekClaimsMismatch(ekCert, claims)
	c.MatchesEKClaims = c.EKClaimsReason == ""
}

// checkWorkload establishes the workload leg's facts: a workload VM's CSV
// report, chaining to a root of the workload policy, bound to this nonce
// and to the AK that signed the quote (workload.ReportData), meeting the
// workload policy.
func (v *Verifier) checkWorkload(ctx context.Context, nonce []byte, ev *attestpb.Evidence, f *Facts) {
	w := &f.Workload
	w.Required = v.opts.RequireWorkload
	if len(ev.GetWorkloadReport()) == 0 {
		if w.Required {
			w.Reason = "workload-evidence-missing"
		}
		return
	}
	w.Present = true
	if v.workloadCSV == nil {
		w.Reason = "workload-not-appraised" // no workload policy: never affirmed
		return
	}
	att := &tpmtoolspb.Attestation{}
	if err := proto.Unmarshal(ev.GetTpmAttestation(), att); err != nil || len(att.GetAkPub()) == 0 {
		w.Reason = "workload-report-without-ak"
		return
	}
	if v.opts.CSVCerts == nil {
		hsk, cek, err := csv.ParseHSKCEK(ev.GetWorkloadHskCek())
		if err != nil {
			w.Reason, w.Detail = "workload-"+csv.ReasonEvidence, "HSK/CEK: "+err.Error()
			return
		}
		ctx = context.WithValue(ctx, hskCEKKey{}, hskCEK{hsk, cek})
	}
	want := workload.ReportData(nonce, att.GetAkPub())
	claims, err := v.opts.Workload.VerifyAndAppraise(ctx, v.workloadCSV, ev.GetWorkloadReport(), want[:])
	if claims != nil {
		w.Simulated, w.Measurement, w.ChipSerial, w.Policy = claims.Simulated, hex.EncodeToString(claims.Measure), claims.ChipSerial, claims.Policy.Raw
	}
	if err != nil {
		var ae *csv.AppraisalError
		switch {
		case errors.As(err, &ae) && ae.Reason == csv.ReasonReportData:
			// Made for another nonce (a replay) or another AK (another
			// VM's TPM).
			w.Reason, w.Detail = "workload-report-not-bound-to-this-nonce-and-ak", ae.Detail
		case errors.As(err, &ae):
			w.Reason, w.Detail = "workload-"+ae.Reason, ae.Detail
		default:
			w.Reason, w.Detail = "workload-"+csv.ReasonEvidence, err.Error()
		}
		return
	}
	w.ReportOK = true
}

// ekPublicMatches reports whether the TPMT_PUBLIC area holds the EK
// certificate's key. Matches are remembered: an instance sends the same
// pair every time.
func (v *Verifier) ekPublicMatches(area []byte, ekCert *x509.Certificate) bool {
	h := sha256.New()
	h.Write(area)
	h.Write(ekCert.Raw)
	var key [32]byte
	h.Sum(key[:0])
	if v.cached(v.ekMatch, key) != nil {
		return true
	}
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](area)
	if err != nil {
		return false
	}
	k, err := tpm2.Pub(*pub)
	if err != nil {
		return false
	}
	eq, ok := k.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !eq.Equal(ekCert.PublicKey) {
		return false
	}
	v.remember(v.ekMatch, key, true)
	return true
}

// parseCert parses a certificate, reusing the result for DER already seen.
// MaxCertificateSize bounds an EK or AK certificate in evidence: the
// CA's are about 1 KiB; nothing larger is parsed.
const MaxCertificateSize = 16 << 10

// parseCert parses a certificate from evidence. Only certificates a
// trusted root signed are kept parsed (trusted does that), so what an
// unauthenticated client sends costs no memory after its call.
func (v *Verifier) parseCert(der []byte) (*x509.Certificate, error) {
	if len(der) > MaxCertificateSize {
		return nil, fmt.Errorf("certificate of %d bytes (at most %d)", len(der), MaxCertificateSize)
	}
	if c, ok := v.cached(v.parsed, sha256.Sum256(der)).(*x509.Certificate); ok {
		return c, nil
	}
	return x509.ParseCertificate(der)
}

// cacheLimit bounds each cache; a full cache starts over.
const cacheLimit = 1 << 14

func (v *Verifier) cached(m map[[32]byte]any, key [32]byte) any {
	v.mu.Lock()
	defer v.mu.Unlock()
	return m[key]
}

func (v *Verifier) remember(m map[[32]byte]any, key [32]byte, val any) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(m) >= cacheLimit {
		clear(m)
	}
	m[key] = val
}

// ekClaimsMismatch says why the fresh report does not come from the chip
// and CVM image on which the CA certified the EK (the EK certificate's CSV
// claims extension, certprofile.OIDCVTPMCSVClaims), or "" if it does.
func ekClaimsMismatch(ekCert *x509.Certificate, claims *csv.Claims) string {
	for _, e := range ekCert.Extensions {
		if !e.Id.Equal(certprofile.OIDCVTPMCSVClaims) {
			continue
		}
		ek, err := certprofile.ParseCSVClaims(e.Value)
		if err != nil {
			return "ek-certificate-csv-claims-malformed"
		}
		chip := sm3.Sum([]byte(claims.ChipSerial))
		if !bytes.Equal(ek.Measurement, claims.Measure) || !bytes.Equal(ek.ChipIDDigest, chip[:]) || ek.Simulated != claims.Simulated {
			return "csv-report-from-another-backend"
		}
		return ""
	}
	return "ek-certificate-without-csv-claims"
}

// CachedCRL and HTTPCRL are internal/pkisig's (the backend uses them too
// for link identities).
type (
	CachedCRL = pkisig.CachedCRL
	HTTPCRL   = pkisig.HTTPCRL
)
