package ca

import (
	"fmt"

	"cvtpm/attest/csv"
)

// Policy is the CA's evidence policy: which CSV evidence earns an EK
// certificate. It is read from a JSON file holding the appraisal fields of
// csv.AppraisalPolicy (roots, measurements, policy bits, firmware, chips)
// plus the CA's own rules:
//
//	{
//	  ...                                             // csv.AppraisalPolicy fields
//	  "reenroll": "same-ek"                           // "same-ek" (default), "any" or "never"
//	}
type Policy struct {
	csv.AppraisalPolicy
	Reenroll string `json:"reenroll"`
}

// LoadPolicy reads and checks a policy file.
func LoadPolicy(path string) (*Policy, error) {
	var p Policy
	if err := csv.DecodePolicyFile(path, &p); err != nil {
		return nil, err
	}
	if err := p.compile(); err != nil {
		return nil, fmt.Errorf("policy %s: %w", path, err)
	}
	return &p, nil
}

// compile checks the fields and loads the listed simulator roots.
func (p *Policy) compile() error {
	if err := p.AppraisalPolicy.Compile(); err != nil {
		return err
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

// Reason codes of refusals; they appear in API errors and the audit log.
const (
	ReasonEvidence       = csv.ReasonEvidence
	ReasonUntrustedRoot  = csv.ReasonUntrustedRoot
	ReasonReportData     = csv.ReasonReportData
	ReasonDebug          = csv.ReasonDebug
	ReasonKeySharing     = csv.ReasonKeySharing
	ReasonMeasurement    = csv.ReasonMeasurement
	ReasonAPIVersion     = csv.ReasonAPIVersion
	ReasonChip           = csv.ReasonChip
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
	if e := p.Appraise(c); e != nil {
		return refuse(e.Reason, e.Detail)
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
