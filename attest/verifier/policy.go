package verifier

import (
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"sort"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
)

//go:embed default.rego
var defaultPolicy string

// DefaultPolicy is the built-in Rego appraisal policy.
func DefaultPolicy() string { return defaultPolicy }

// appraiser turns the verified facts into one verdict per EAR submodule.
type appraiser interface {
	eval(ctx context.Context, f *Facts) (map[string]Submod, error)
}

// newAppraiser is the built-in policy (in its compiled Go form) when
// module is empty, else the operator's Rego module.
func newAppraiser(ctx context.Context, module string, reference map[string]any) (appraiser, error) {
	if module == "" {
		return newBuiltinPolicy(reference)
	}
	return compilePolicy(ctx, module, reference)
}

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
// Facts' JSON form, built directly as a Rego value (a JSON round trip, or
// OPA's conversion of a Go map, costs more than the policy itself).
func (f *Facts) input() ast.Value {
	str, boolean := ast.StringTerm, ast.BooleanTerm
	item := func(k string, v *ast.Term) [2]*ast.Term { return ast.Item(str(k), v) }
	pcrs := make([][2]*ast.Term, 0, len(f.TPM.PCRs))
	for k, v := range f.TPM.PCRs {
		pcrs = append(pcrs, item(k, str(v)))
	}
	return ast.NewObject(
		item("nonce", ast.ObjectTerm(item("ok", boolean(f.Nonce.OK)), item("reason", str(f.Nonce.Reason)))),
		item("tpm", ast.ObjectTerm(
			item("ek_trusted", boolean(f.TPM.EKTrusted)), item("ek_reason", str(f.TPM.EKReason)),
			item("ek_revoked", boolean(f.TPM.EKRevoked)), item("ek_serial", str(f.TPM.EKSerial)),
			item("ak_bound", boolean(f.TPM.AKBound)), item("ak_reason", str(f.TPM.AKReason)),
			item("quote_ok", boolean(f.TPM.QuoteOK)), item("quote_reason", str(f.TPM.QuoteReason)),
			item("pcrs", ast.ObjectTerm(pcrs...)), item("detail", str(f.TPM.Detail)))),
		item("csv", ast.ObjectTerm(
			item("report_ok", boolean(f.CSV.ReportOK)), item("reason", str(f.CSV.Reason)), item("detail", str(f.CSV.Detail)),
			item("simulated", boolean(f.CSV.Simulated)), item("matches_ek_claims", boolean(f.CSV.MatchesEKClaims)),
			item("ek_claims_reason", str(f.CSV.EKClaimsReason)),
			item("measurement", str(f.CSV.Measurement)), item("chip_serial", str(f.CSV.ChipSerial)),
			item("instance", str(f.CSV.Instance)))),
		item("workload", ast.ObjectTerm(
			item("present", boolean(f.Workload.Present)), item("required", boolean(f.Workload.Required)),
			item("report_ok", boolean(f.Workload.ReportOK)), item("reason", str(f.Workload.Reason)),
			item("detail", str(f.Workload.Detail)), item("simulated", boolean(f.Workload.Simulated)),
			item("measurement", str(f.Workload.Measurement)), item("chip_serial", str(f.Workload.ChipSerial)),
			item("policy", ast.NumberTerm(json.Number(fmt.Sprint(f.Workload.Policy)))))),
	)
}

// eval runs the policy on the facts and returns one verdict per submodule.
func (p *regoPolicy) eval(ctx context.Context, f *Facts) (map[string]Submod, error) {
	rs, err := p.query.Eval(ctx, rego.EvalParsedInput(f.input()))
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
