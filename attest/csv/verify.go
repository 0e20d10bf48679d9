package csv

import (
	"bytes"
	"context"
	"crypto/subtle"
	_ "embed"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"github.com/emmansun/gmsm/sm3"
)

//go:embed hrk.cert
var builtinHRK []byte

// BuiltinHRK returns HYGON's real root key certificate (copied from
// openanolis/csv-rs src/certs/builtin/hrk.cert). It is the only root whose
// results are not marked Simulated.
func BuiltinHRK() *CACert {
	return builtinRoot()
}

var builtinRoot = sync.OnceValue(func() *CACert {
	c, err := ParseCACert(builtinHRK)
	if err != nil {
		panic("csv: embedded hrk.cert is corrupt: " + err.Error())
	}
	return c
})

var builtinFingerprint = sync.OnceValue(func() string { return builtinRoot().Fingerprint() })

// Fingerprint is the hex SM3 digest of the certificate's 832 bytes; roots are
// named by it in claims.
func (c *CACert) Fingerprint() string {
	d := sm3.Sum(c.Marshal())
	return hex.EncodeToString(d[:])
}

// CheckError names the first verification step that failed.
type CheckError struct {
	Check string // for example "pek signed by cek"
	Err   error
}

func (e *CheckError) Error() string { return e.Check + ": " + e.Err.Error() }
func (e *CheckError) Unwrap() error { return e.Err }

// Names of the verification steps, in order, as CheckError.Check reports them.
const (
	CheckParse      = "parse report"
	CheckCodes      = "report signature usage/algorithm"
	CheckMAC        = "report mac"
	CheckFetch      = "fetch hsk/cek"
	CheckRoot       = "root self-signature"
	CheckHSK        = "hsk signed by root"
	CheckCEK        = "cek signed by hsk"
	CheckPEK        = "pek signed by cek"
	CheckReportSig  = "report signed by pek"
	CheckReportData = "report_data"
)

// RootInfo names the root a report chained to.
type RootInfo struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
}

// Claims are the verified contents of a report. Byte fields are hex in JSON.
type Claims struct {
	Version          int        `json:"version"`
	Policy           Policy     `json:"policy"`
	Measure          HexBytes   `json:"measure"`
	ReportData       HexBytes   `json:"report_data"`
	MNonce           HexBytes   `json:"mnonce"`
	VMID             HexBytes   `json:"vm_id"`
	VMVersion        HexBytes   `json:"vm_version"`
	UserPubKeyDigest HexBytes   `json:"user_pubkey_digest"`
	ChipSerial       string     `json:"chip_serial"`
	Firmware         string     `json:"firmware"` // PEK certificate's firmware major.minor
	Build            uint32     `json:"build,omitempty"`
	RTMRVersion      uint16     `json:"rtmr_version,omitempty"`
	RTMRs            [][]byte   `json:"-"`
	RTMRHex          []HexBytes `json:"rtmrs,omitempty"`
	Root             RootInfo   `json:"root"`
	Simulated        bool       `json:"simulated"`
}

// HexBytes marshals to JSON as a hex string.
type HexBytes []byte

// MarshalText encodes b as lower-case hex.
func (b HexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(b)), nil }

// CertSource supplies the HSK and CEK of a chip by its serial number.
type CertSource interface {
	HSKCEK(ctx context.Context, chipSerial string) (hsk *CACert, cek *CSVCert, err error)
}

// VerifierOptions configure a Verifier.
type VerifierOptions struct {
	// TrustedRoots are the HRK certificates a chain may end in. Empty means
	// only the built-in real HRK. A root that is not byte-identical to the
	// built-in HRK yields Simulated claims.
	TrustedRoots []*CACert
	// Certs supplies HSK+CEK per chip serial. Required.
	Certs CertSource
}

// Verifier checks CSV reports against explicit roots. It caches verified
// HSK/CEK pairs, so steady-state cost is the PEK and report signatures.
type Verifier struct {
	roots []*CACert
	certs CertSource

	mu       sync.Mutex
	verified map[[32]byte]RootInfo // SM3(hsk||cek) -> root the pair chained to
	pekOK    map[[32]byte]bool     // SM3(cek||pek) of PEKs found signed by their CEK
	rootErr  map[int]error
}

// NewVerifier returns a verifier for opts.
func NewVerifier(opts VerifierOptions) *Verifier {
	roots := opts.TrustedRoots
	if len(roots) == 0 {
		roots = []*CACert{BuiltinHRK()}
	}
	return &Verifier{roots: roots, certs: opts.Certs, verified: map[[32]byte]RootInfo{}, pekOK: map[[32]byte]bool{}, rootErr: map[int]error{}}
}

const maxVerifiedChains = 4096

func fail(check string, err error) error { return &CheckError{Check: check, Err: err} }

// Verify checks a report end to end: parse, usage codes, MAC, HSK/CEK for the
// chip, root -> HSK -> CEK -> PEK -> report signatures and, if
// expectedReportData is not nil, that report_data equals it zero-padded to 64
// bytes. On failure the error is a *CheckError naming the first failed step.
func (v *Verifier) Verify(ctx context.Context, reportBytes, expectedReportData []byte) (*Claims, error) {
	r, err := ParseReport(reportBytes)
	if err != nil {
		return nil, fail(CheckParse, err)
	}
	if r.SigUsage != UsagePEK || r.SigAlgo != AlgoSM2SA {
		return nil, fail(CheckCodes, fmt.Errorf("usage %#x algo %#x, want %#x %#x", r.SigUsage, r.SigAlgo, UsagePEK, AlgoSM2SA))
	}
	mac := r.ComputeMAC()
	if subtle.ConstantTimeCompare(mac[:], r.MAC[:]) != 1 {
		return nil, fail(CheckMAC, errors.New("HMAC-SM3 over pek||sn||reserved does not match"))
	}
	if v.certs == nil {
		return nil, fail(CheckFetch, errors.New("no certificate source configured"))
	}
	hsk, cek, err := v.certs.HSKCEK(ctx, r.ChipSerial())
	if err != nil {
		return nil, fail(CheckFetch, fmt.Errorf("chip %q: %w", r.ChipSerial(), err))
	}
	root, err := v.verifyHSKCEK(hsk, cek)
	if err != nil {
		return nil, err
	}
	if err := v.verifyPEK(cek, r.PEK); err != nil {
		return nil, fail(CheckPEK, err)
	}
	if err := checkUID(r.PEK.UIDSize, r.PEK.UserID[:]); err != nil {
		return nil, fail(CheckReportSig, err)
	}
	pekUID, _ := r.PEK.UID()
	if err := verifySM2(&r.PEK.PubKey, pekUID, r.SignedBytes(), &r.Sig); err != nil {
		return nil, fail(CheckReportSig, err)
	}
	if expectedReportData != nil {
		if len(expectedReportData) > 64 {
			return nil, fail(CheckReportData, fmt.Errorf("expected report_data is %d bytes, at most 64", len(expectedReportData)))
		}
		var want [64]byte
		copy(want[:], expectedReportData)
		if subtle.ConstantTimeCompare(want[:], r.ReportData[:]) != 1 {
			return nil, fail(CheckReportData, errors.New("report_data differs from the expected value"))
		}
	}
	c := &Claims{
		Version: r.Version, Policy: DecodePolicy(r.Policy),
		Measure: r.Measure[:], ReportData: r.ReportData[:], MNonce: r.MNonce[:],
		VMID: r.VMID[:], VMVersion: r.VMVersion[:], UserPubKeyDigest: r.UserPubKeyDigest[:],
		ChipSerial: r.ChipSerial(),
		Firmware:   fmt.Sprintf("%d.%d", r.PEK.FirmwareMajor, r.PEK.FirmwareMinor),
		Root:       root,
		Simulated:  root.Fingerprint != builtinFingerprint(),
	}
	if r.Version == 2 {
		c.Build, c.RTMRVersion = r.Build, r.RTMRVersion
		for i := range r.RTMR {
			c.RTMRs = append(c.RTMRs, bytes.Clone(r.RTMR[i][:]))
		}
	}
	return c, nil
}

// verifyPEK checks that cek signed pek, remembering pairs already checked:
// a chip's PEK changes only when its owner regenerates it, so a verifier
// serving many reports from one backend pays the SM2 verification once.
func (v *Verifier) verifyPEK(cek, pek *CSVCert) error {
	key := sm3.Sum(append(cek.Marshal(), pek.Marshal()...))
	v.mu.Lock()
	ok := v.pekOK[key]
	v.mu.Unlock()
	if ok {
		return nil
	}
	if err := verifyCSVBy(cek.KeyUsage, &cek.PubKey, cek.UIDSize, cek.UserID[:], pek, UsagePEK); err != nil {
		return err
	}
	v.mu.Lock()
	if len(v.pekOK) >= maxVerifiedChains {
		clear(v.pekOK)
	}
	v.pekOK[key] = true
	v.mu.Unlock()
	return nil
}

func checkUID(n uint16, field []byte) error {
	_, err := uid(n, field)
	return err
}

// verifyHSKCEK checks root -> HSK -> CEK, remembering pairs that verified.
func (v *Verifier) verifyHSKCEK(hsk *CACert, cek *CSVCert) (RootInfo, error) {
	key := sm3.Sum(append(hsk.Marshal(), cek.Marshal()...))
	v.mu.Lock()
	ri, ok := v.verified[key]
	v.mu.Unlock()
	if ok {
		return ri, nil
	}
	var root *CACert
	var rootIdx int
	for i, r := range v.roots {
		if r.KeyID == hsk.SigKeyID {
			root, rootIdx = r, i
			break
		}
	}
	if root == nil {
		return RootInfo{}, fail(CheckHSK, fmt.Errorf("HSK was signed by key %x, not by a trusted root", hsk.SigKeyID))
	}
	if err := v.checkRoot(rootIdx, root); err != nil {
		return RootInfo{}, fail(CheckRoot, err)
	}
	if err := verifyCA(root, hsk, UsageHSK); err != nil {
		return RootInfo{}, fail(CheckHSK, err)
	}
	if err := verifyCSVBy(hsk.Usage, &hsk.PubKey, hsk.UIDSize, hsk.UserID[:], cek, UsageCEK); err != nil {
		return RootInfo{}, fail(CheckCEK, err)
	}
	ri = RootInfo{Name: rootName(root), Fingerprint: root.Fingerprint()}
	v.mu.Lock()
	if len(v.verified) >= maxVerifiedChains {
		clear(v.verified)
	}
	v.verified[key] = ri
	v.mu.Unlock()
	return ri, nil
}

func (v *Verifier) checkRoot(i int, root *CACert) error {
	v.mu.Lock()
	err, done := v.rootErr[i]
	v.mu.Unlock()
	if done {
		return err
	}
	err = verifyCA(root, root, UsageHRK)
	v.mu.Lock()
	v.rootErr[i] = err
	v.mu.Unlock()
	return err
}

func rootName(root *CACert) string {
	if bytes.Equal(root.Marshal(), builtinHRK) {
		return "HYGON HRK"
	}
	return "non-HYGON root (simulated or untrusted) key id " + hex.EncodeToString(root.KeyID[:])
}

// ParseRoot decodes a root (HRK) certificate to trust and checks that it
// is one: usage HRK and a valid self-signature. A garbage or truncated
// file is refused when it is loaded, not later as a failed chain.
func ParseRoot(b []byte) (*CACert, error) {
	c, err := ParseCACert(b)
	if err != nil {
		return nil, err
	}
	if err := verifyCA(c, c, UsageHRK); err != nil {
		return nil, fmt.Errorf("not a self-signed root (HRK) certificate: %w", err)
	}
	return c, nil
}

// verifyCA checks that signer signed the CA certificate c and that c has the
// expected usage and names signer's key id.
func verifyCA(signer, c *CACert, usage uint32) error {
	if c.Usage != usage {
		return fmt.Errorf("certificate usage %#x, want %#x", c.Usage, usage)
	}
	if signer.Usage != UsageHRK {
		return fmt.Errorf("signer usage %#x, want HRK %#x", signer.Usage, UsageHRK)
	}
	if c.SigKeyID != signer.KeyID {
		return fmt.Errorf("signed by key id %x, signer is %x", c.SigKeyID, signer.KeyID)
	}
	id, err := signer.UID()
	if err != nil {
		return fmt.Errorf("signer: %w", err)
	}
	return verifySM2(&signer.PubKey, id, c.Marshal()[:caSignedLen], &c.Sig)
}

// verifyCSVBy checks that a key with signerUsage signed the CSV certificate c
// in one of its slots, and that c's key has the expected usage and algorithm.
func verifyCSVBy(signerUsage uint32, signerKey *PubKey, uidSize uint16, uidField []byte, c *CSVCert, usage uint32) error {
	if c.KeyUsage != usage || c.KeyAlgo != AlgoSM2SA {
		return fmt.Errorf("key usage %#x algo %#x, want %#x %#x", c.KeyUsage, c.KeyAlgo, usage, AlgoSM2SA)
	}
	id, err := uid(uidSize, uidField)
	if err != nil {
		return fmt.Errorf("signer: %w", err)
	}
	msg := c.Marshal()[:csvSignedLen]
	var last error = fmt.Errorf("no signature slot by a key with usage %#x", signerUsage)
	for i := range c.Sigs {
		s := &c.Sigs[i]
		if s.empty() || s.Usage != signerUsage || s.Algo != AlgoSM2SA {
			continue
		}
		if last = verifySM2(signerKey, id, msg, &s.Sig); last == nil {
			return nil
		}
		last = fmt.Errorf("slot %d: %w", i, last)
	}
	return last
}
