package ca

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"

	"cvtpm/attest/csv"
)

// Policy is the CA's evidence policy: which CSV evidence earns an EK
// certificate. It is read from a JSON file; every field is optional and the
// zero value is the strictest sensible policy (real HYGON root only, debug
// and key sharing refused, any measurement refused until one is approved).
//
//	{
//	  "simulator_roots": ["/etc/cvtpm/sim-hrk.cert"],  // extra HRKs (simulators); the real HRK is always trusted
//	  "approved_measurements": ["1178dadb...a052"],   // hex launch measurements of the vTPM CVM
//	  "allow_debug": false,                           // accept guests without the NODBG policy bit
//	  "allow_key_sharing": false,                     // accept guests without the NOKS policy bit
//	  "min_api": "1.2",                               // lowest firmware API major.minor
//	  "allow_chips": [], "deny_chips": ["NZA9T..."],  // chip serial lists (empty allow list = any)
//	  "reenroll": "same-ek"                           // "same-ek" (default), "any" or "never"
//	}
type Policy struct {
	SimulatorRoots       []string `json:"simulator_roots"`
	ApprovedMeasurements []string `json:"approved_measurements"`
	AllowDebug           bool     `json:"allow_debug"`
	AllowKeySharing      bool     `json:"allow_key_sharing"`
	MinAPI               string   `json:"min_api"`
	AllowChips           []string `json:"allow_chips"`
	DenyChips            []string `json:"deny_chips"`
	Reenroll             string   `json:"reenroll"`

	minMajor, minMinor int
	roots              []*csv.CACert
}

// LoadPolicy reads and checks a policy file.
func LoadPolicy(path string) (*Policy, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading policy: %w", err)
	}
	var p Policy
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	if err := p.compile(); err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return &p, nil
}

// compile checks the fields and loads the listed simulator roots.
func (p *Policy) compile() error {
	p.roots = []*csv.CACert{csv.BuiltinHRK()}
	for _, f := range p.SimulatorRoots {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("simulator root: %w", err)
		}
		root, err := csv.ParseCACert(b)
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
	switch p.Reenroll {
	case "":
		p.Reenroll = "same-ek"
	case "same-ek", "any", "never":
	default:
		return fmt.Errorf("reenroll %q: want same-ek, any or never", p.Reenroll)
	}
	return nil
}

// TrustedRoots are the HRKs a report may chain to under this policy.
func (p *Policy) TrustedRoots() []*csv.CACert { return p.roots }

// Reason codes of refusals; they appear in API errors and the audit log.
const (
	ReasonEvidence       = "evidence-invalid"
	ReasonUntrustedRoot  = "untrusted-root"
	ReasonReportData     = "report-data-mismatch"
	ReasonDebug          = "debug-policy"
	ReasonKeySharing     = "key-sharing-policy"
	ReasonMeasurement    = "measurement-not-approved"
	ReasonAPIVersion     = "firmware-api-too-old"
	ReasonChip           = "chip-not-allowed"
	ReasonNonce          = "nonce-unknown-or-used"
	ReasonNonceExpired   = "nonce-expired"
	ReasonReenroll       = "reenrollment-refused"
	ReasonBadRequest     = "bad-request"
	ReasonRevoked        = "certificate-revoked"
	ReasonActivation     = "credential-activation-failed"
	ReasonInternalFailed = "internal-error"
)

// appraise applies the policy to verified claims.
func (p *Policy) appraise(c *csv.Claims) *Refusal {
	if !p.AllowDebug && !c.Policy.NoDebug {
		return refuse(ReasonDebug, "the guest policy allows debugging (NODBG is not set)")
	}
	if !p.AllowKeySharing && !c.Policy.NoKeyShare {
		return refuse(ReasonKeySharing, "the guest policy allows key sharing (NOKS is not set)")
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

// Refusal is why the CA refused an enrollment.
type Refusal struct {
	Reason string // one of the Reason* codes
	Detail string
}

func (r *Refusal) Error() string { return "enrollment refused: " + r.Reason + ": " + r.Detail }

func refuse(reason, detail string) *Refusal { return &Refusal{Reason: reason, Detail: detail} }
