package verifier

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// builtinPolicy is default.rego written in Go: the same reasons, warnings
// and statuses for the same facts (TestBuiltinPolicyIsDefaultRego holds the
// two equal over random facts), at a fraction of OPA's cost per
// attestation. The Rego text stays the policy's definition and what
// --rego replaces; this is its compiled form.
type builtinPolicy struct {
	reference map[string]string // SHA-256 PCR index -> expected hex value
}

func newBuiltinPolicy(reference map[string]any) (*builtinPolicy, error) {
	// Through JSON, as OPA reads data.reference: Go maps of any type give
	// the same values, and a shape the policy cannot read is an error,
	// never a reference silently ignored.
	b, err := json.Marshal(reference)
	if err != nil {
		return nil, fmt.Errorf("reference values: %w", err)
	}
	var ref struct {
		PCRs map[string]json.RawMessage `json:"pcrs"`
	}
	if err := json.Unmarshal(b, &ref); err != nil {
		return nil, fmt.Errorf("reference values: %w (want {\"pcrs\": {\"sha256\": {\"16\": \"<hex>\"}}})", err)
	}
	p := &builtinPolicy{reference: map[string]string{}}
	if bank, ok := ref.PCRs["sha256"]; ok {
		if err := json.Unmarshal(bank, &p.reference); err != nil {
			return nil, fmt.Errorf("reference values: pcrs.sha256: %w (want index -> hex string)", err)
		}
	}
	return p, nil
}

// reasonSet is a Rego set of strings: each once, sorted when read.
type reasonSet map[string]bool

func (s reasonSet) add(r ...string) {
	for _, x := range r {
		s[x] = true
	}
}

func (s reasonSet) sorted(more reasonSet) []string {
	out := make([]string, 0, len(s)+len(more))
	for r := range s {
		out = append(out, r)
	}
	for r := range more {
		if !s[r] {
			out = append(out, r)
		}
	}
	slices.Sort(out)
	return out
}

func verdict(reasons, warnings reasonSet) Submod {
	s := Submod{Status: StatusAffirming, Reasons: reasons.sorted(warnings)}
	switch {
	case len(reasons) > 0:
		s.Status = StatusContraindicated
	case len(warnings) > 0:
		s.Status = StatusWarning
	}
	if len(s.Reasons) == 0 {
		s.Reasons = nil
	}
	return s
}

func (p *builtinPolicy) eval(_ context.Context, f *Facts) (map[string]Submod, error) {
	nonce := reasonSet{}
	if !f.Nonce.OK {
		nonce.add(f.Nonce.Reason)
	}

	vtpm := reasonSet{}
	vtpm.add(nonce.sorted(nil)...)
	if !f.TPM.EKTrusted {
		vtpm.add(f.TPM.EKReason)
	}
	if f.TPM.EKRevoked {
		vtpm.add("ek-certificate-revoked")
	}
	if !f.TPM.AKBound {
		vtpm.add(f.TPM.AKReason)
	}
	if !f.TPM.QuoteOK {
		vtpm.add(f.TPM.QuoteReason)
	} else {
		// A reference PCR that differs, or is missing from the quote.
		for i, want := range p.reference {
			if got, ok := f.TPM.PCRs[i]; !ok || strings.ToLower(got) != strings.ToLower(want) {
				vtpm.add("pcr-" + i + "-not-reference")
			}
		}
	}

	csvReasons, csvWarnings := reasonSet{}, reasonSet{}
	csvReasons.add(nonce.sorted(nil)...)
	if !f.CSV.ReportOK {
		csvReasons.add(f.CSV.Reason)
	} else if !f.CSV.MatchesEKClaims {
		// The fresh report must come from the chip and CVM image that
		// the EK certificate's CSV claims record.
		r := "csv-report-from-another-backend"
		if f.CSV.EKClaimsReason != "" {
			r = f.CSV.EKClaimsReason
		}
		csvReasons.add(r)
	}
	if f.CSV.Simulated {
		csvWarnings.add("simulated-csv-evidence")
	}

	out := map[string]Submod{
		"cvtpm-vtpm":   verdict(vtpm, nil),
		"csv-platform": verdict(csvReasons, csvWarnings),
	}
	if w := &f.Workload; w.Present || w.Required {
		reasons, warnings := reasonSet{}, reasonSet{}
		reasons.add(nonce.sorted(nil)...)
		if !w.ReportOK {
			reasons.add(w.Reason)
		} else if w.Simulated {
			warnings.add("simulated-csv-evidence")
		}
		out["csv-workload"] = verdict(reasons, warnings)
	}
	return out, nil
}
