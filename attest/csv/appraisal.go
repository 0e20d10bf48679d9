package csv

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
)

// AppraisalPolicy says which verified CSV claims a relying party accepts:
// the trusted roots, launch measurements, guest policy bits, firmware
// version and chips. The CA (ca.Policy) and the attested link's clients
// share it, so one JSON file format describes "a backend we trust". Every
// field is optional and the zero value is the strictest sensible policy
// (real HYGON root only, debug and key sharing refused, any measurement
// refused until one is approved).
//
//	{
//	  "simulator_roots": ["/etc/cvtpm/sim-hrk.cert"],  // extra HRKs (simulators); the real HRK is always trusted
//	  "approved_measurements": ["1178dadb...a052"],   // hex launch measurements of the vTPM CVM
//	  "allow_debug": false,                           // accept guests without the NODBG policy bit
//	  "allow_key_sharing": false,                     // accept guests without the NOKS policy bit
//	  "allow_csv1": false,                            // accept CSV1 guests (no ES bit: register state not encrypted)
//	  "min_api": "1.2",                               // lowest firmware API major.minor
//	  "allow_chips": [], "deny_chips": ["NZA9T..."]   // chip serial lists (empty allow list = any)
//	}
type AppraisalPolicy struct {
	SimulatorRoots       []string `json:"simulator_roots"`
	ApprovedMeasurements []string `json:"approved_measurements"`
	AllowDebug           bool     `json:"allow_debug"`
	AllowKeySharing      bool     `json:"allow_key_sharing"`
	// AllowCSV1 accepts a guest whose policy lacks the ES bit (CSV1): its
	// memory is encrypted but its register state is not, so the host can
	// read and change the vCPU's registers. Off by default: CSV2 or later.
	AllowCSV1  bool     `json:"allow_csv1"`
	MinAPI     string   `json:"min_api"`
	AllowChips []string `json:"allow_chips"`
	DenyChips  []string `json:"deny_chips"`

	minMajor, minMinor int
	roots              []*CACert
}

// Reason codes of an appraisal refusal. They are stable strings: the CA's
// audit log and API errors and the link's errors carry them.
const (
	ReasonEvidence      = "evidence-invalid"
	ReasonUntrustedRoot = "untrusted-root"
	ReasonReportData    = "report-data-mismatch"
	ReasonDebug         = "debug-policy"
	ReasonKeySharing    = "key-sharing-policy"
	ReasonCSV1          = "csv1-register-state-not-encrypted"
	ReasonMeasurement   = "measurement-not-approved"
	ReasonAPIVersion    = "firmware-api-too-old"
	ReasonChip          = "chip-not-allowed"
)

// AppraisalError is why evidence was not accepted.
type AppraisalError struct {
	Reason string // one of the Reason* codes
	Detail string
}

func (e *AppraisalError) Error() string { return e.Reason + ": " + e.Detail }

// LoadAppraisalPolicy reads a policy file holding only appraisal fields.
func LoadAppraisalPolicy(path string) (*AppraisalPolicy, error) {
	var p AppraisalPolicy
	if err := DecodePolicyFile(path, &p); err != nil {
		return nil, err
	}
	if err := p.Compile(); err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return &p, nil
}

// DecodePolicyFile reads a JSON policy file into v, refusing unknown
// fields so that a misspelt setting is an error rather than silently lax.
func DecodePolicyFile(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading policy: %w", err)
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("policy %s: %w", path, err)
	}
	return nil
}

// Compile checks the fields and loads the listed simulator roots. It must
// run before TrustedRoots or Appraise.
func (p *AppraisalPolicy) Compile() error {
	p.roots = []*CACert{BuiltinHRK()}
	for _, f := range p.SimulatorRoots {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("simulator root: %w", err)
		}
		root, err := ParseRoot(b)
		if err != nil {
			return fmt.Errorf("simulator root %s: %w", f, err)
		}
		p.roots = append(p.roots, root)
	}
	for _, m := range p.ApprovedMeasurements {
		if b, err := hex.DecodeString(m); err != nil || len(b) != 32 {
			return fmt.Errorf("approved measurement %q: want 64 hex digits", m)
		}
	}
	if p.MinAPI != "" {
		if _, err := fmt.Sscanf(p.MinAPI, "%d.%d", &p.minMajor, &p.minMinor); err != nil {
			return fmt.Errorf("min_api %q: want major.minor", p.MinAPI)
		}
	}
	return nil
}

// TrustedRoots are the HRKs a report may chain to under this policy.
func (p *AppraisalPolicy) TrustedRoots() []*CACert {
	if p.roots == nil {
		return []*CACert{BuiltinHRK()}
	}
	return p.roots
}

// Appraise applies the policy to verified claims; nil means accepted.
func (p *AppraisalPolicy) Appraise(c *Claims) *AppraisalError {
	refuse := func(reason, detail string) *AppraisalError { return &AppraisalError{Reason: reason, Detail: detail} }
	if !p.AllowDebug && !c.Policy.NoDebug {
		return refuse(ReasonDebug, "the guest policy allows debugging (NODBG is not set)")
	}
	if !p.AllowKeySharing && !c.Policy.NoKeyShare {
		return refuse(ReasonKeySharing, "the guest policy allows key sharing (NOKS is not set)")
	}
	if !p.AllowCSV1 && !c.Policy.ES {
		return refuse(ReasonCSV1, "the guest is CSV1 (the policy's ES bit is not set): its register state is not encrypted; CSV2 or later is required unless the policy allows CSV1")
	}
	if !slices.ContainsFunc(p.ApprovedMeasurements, func(m string) bool { return strings.EqualFold(m, hex.EncodeToString(c.Measure)) }) {
		return refuse(ReasonMeasurement, "measurement "+hex.EncodeToString(c.Measure)+" is not approved")
	}
	if p.MinAPI != "" {
		major, minor := int(c.Policy.APIMajor), int(c.Policy.APIMinor)
		if major < p.minMajor || (major == p.minMajor && minor < p.minMinor) {
			return refuse(ReasonAPIVersion, fmt.Sprintf("firmware API %d.%d is below %s", major, minor, p.MinAPI))
		}
	}
	if slices.Contains(p.DenyChips, c.ChipSerial) ||
		(len(p.AllowChips) > 0 && !slices.Contains(p.AllowChips, c.ChipSerial)) {
		return refuse(ReasonChip, "chip "+c.ChipSerial+" is not allowed")
	}
	return nil
}

// VerifyAndAppraise verifies a report against v (chain to a trusted root,
// signatures, report_data == wantReportData) and then applies p. Any
// failure comes back as an *AppraisalError whose Reason names the failed
// check, so every relying party reports refusals with the same codes.
func (p *AppraisalPolicy) VerifyAndAppraise(ctx context.Context, v *Verifier, report, wantReportData []byte) (*Claims, error) {
	claims, err := v.Verify(ctx, report, wantReportData)
	if err != nil {
		var ce *CheckError
		switch {
		case errors.As(err, &ce) && ce.Check == CheckReportData:
			return nil, &AppraisalError{Reason: ReasonReportData, Detail: err.Error()}
		case errors.As(err, &ce) && (ce.Check == CheckHSK || ce.Check == CheckRoot):
			return nil, &AppraisalError{Reason: ReasonUntrustedRoot, Detail: err.Error()}
		default:
			return nil, &AppraisalError{Reason: ReasonEvidence, Detail: err.Error()}
		}
	}
	if e := p.Appraise(claims); e != nil {
		return claims, e
	}
	return claims, nil
}
