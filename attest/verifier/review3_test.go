package verifier

import (
	"context"
	"reflect"
	"strings"
	"testing"
)

// Review 3: the built-in policy's Go form reads reference values only as
// map[string]any; default.rego (what it must equal, and what
// Options.Reference fed before today) reads any JSON-like Go value. A
// caller of the library API that passes typed maps (or a list) gets every
// PCR refused by Rego and none checked by the Go form: it affirms a quote
// whose PCR 16 is not the reference.
func TestReview3BuiltinIgnoresTypedReference(t *testing.T) {
	ctx := context.Background()
	ref := strings.Repeat("aa", 32)
	f := &Facts{}
	f.Nonce.OK, f.TPM.EKTrusted, f.TPM.AKBound, f.TPM.QuoteOK = true, true, true, true
	f.TPM.PCRs = map[string]string{"16": strings.Repeat("bb", 32)}
	f.CSV.ReportOK, f.CSV.MatchesEKClaims = true, true
	for name, reference := range map[string]map[string]any{
		"map[string]string":            {"pcrs": map[string]any{"sha256": map[string]string{"16": ref}}},
		"map[string]map[string]string": {"pcrs": map[string]map[string]string{"sha256": {"16": ref}}},
	} {
		rg, err := compilePolicy(ctx, "", reference)
		if err != nil {
			t.Fatal(err)
		}
		want, err := rg.eval(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		gp, err := newAppraiser(ctx, "", reference) // what New uses with no --rego
		if err != nil {
			continue // refusing a reference it cannot read is a fix
		}
		got, err := gp.eval(ctx, f)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("reference as %s: built-in Go form %v, default.rego %v (Go affirms a PCR Rego refuses)", name, got, want)
		}
	}
}
