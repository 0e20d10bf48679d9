package verifier

import (
	"context"
	_ "embed"
	"fmt"
	"sort"

	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
)

//go:embed default.rego
var defaultPolicy string

// DefaultPolicy is the built-in Rego appraisal policy.
func DefaultPolicy() string { return defaultPolicy }

type regoPolicy struct{ query rego.PreparedEvalQuery }

func compilePolicy(ctx context.Context, module string, reference map[string]any) (*regoPolicy, error) {
	if module == "" {
		module = defaultPolicy
	}
	if reference == nil {
		reference = map[string]any{}
	}
	store := inmem.NewFromObject(map[string]any{"reference": reference})
	q, err := rego.New(
		rego.Query("data.cvtpm.result"),
		rego.Module("policy.rego", module),
		rego.Store(store),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("appraisal policy: %w", err)
	}
	return &regoPolicy{query: q}, nil
}

// input is the facts as the policy sees them: the same field names as
// Facts' JSON form, built directly (a JSON round trip per appraisal costs
// more than the policy itself).
func (f *Facts) input() map[string]any {
	pcrs := make(map[string]any, len(f.TPM.PCRs))
	for k, v := range f.TPM.PCRs {
		pcrs[k] = v
	}
	return map[string]any{
		"nonce": map[string]any{"ok": f.Nonce.OK, "reason": f.Nonce.Reason},
		"tpm": map[string]any{
			"ek_trusted": f.TPM.EKTrusted, "ek_reason": f.TPM.EKReason, "ek_revoked": f.TPM.EKRevoked,
			"ek_serial": f.TPM.EKSerial, "ak_bound": f.TPM.AKBound, "ak_reason": f.TPM.AKReason,
			"quote_ok": f.TPM.QuoteOK, "quote_reason": f.TPM.QuoteReason, "pcrs": pcrs, "detail": f.TPM.Detail,
		},
		"csv": map[string]any{
			"report_ok": f.CSV.ReportOK, "reason": f.CSV.Reason, "detail": f.CSV.Detail,
			"simulated": f.CSV.Simulated, "matches_ek_claims": f.CSV.MatchesEKClaims,
			"measurement": f.CSV.Measurement, "chip_serial": f.CSV.ChipSerial, "instance": f.CSV.Instance,
		},
	}
}

// eval runs the policy on the facts and returns one verdict per submodule.
func (p *regoPolicy) eval(ctx context.Context, f *Facts) (map[string]Submod, error) {
	rs, err := p.query.Eval(ctx, rego.EvalInput(f.input()))
	if err != nil {
		return nil, fmt.Errorf("appraisal policy: %w", err)
	}
	if len(rs) != 1 || len(rs[0].Expressions) != 1 {
		return nil, fmt.Errorf("appraisal policy: data.cvtpm.result is undefined")
	}
	raw, ok := rs[0].Expressions[0].Value.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("appraisal policy: result is %T, want an object", rs[0].Expressions[0].Value)
	}
	out := map[string]Submod{}
	for name, v := range raw {
		m, _ := v.(map[string]any)
		s := Submod{}
		s.Status, _ = m["status"].(string)
		switch s.Status {
		case StatusAffirming, StatusWarning, StatusContraindicated:
		default:
			return nil, fmt.Errorf("appraisal policy: submodule %q has status %q", name, s.Status)
		}
		if rs, ok := m["reasons"].([]any); ok {
			for _, r := range rs {
				s.Reasons = append(s.Reasons, fmt.Sprint(r))
			}
		}
		sort.Strings(s.Reasons)
		out[name] = s
	}
	return out, nil
}
