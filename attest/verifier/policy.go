package verifier

import (
	"context"
	_ "embed"
	"encoding/json"
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

// eval runs the policy on the facts and returns one verdict per submodule.
func (p *regoPolicy) eval(ctx context.Context, f *Facts) (map[string]Submod, error) {
	// The policy sees the facts as JSON, the same shape the token carries.
	b, err := json.Marshal(f)
	if err != nil {
		return nil, err
	}
	var input map[string]any
	if err := json.Unmarshal(b, &input); err != nil {
		return nil, err
	}
	rs, err := p.query.Eval(ctx, rego.EvalInput(input))
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
