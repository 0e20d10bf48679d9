package verifier

import (
	"context"
	"math/rand/v2"
	"reflect"
	"testing"
)

// The built-in policy's Go form gives what default.rego gives, over random
// facts: every flag, empty and repeated reasons, PCRs present, missing and
// in other case, with and without reference values.
func TestBuiltinPolicyIsDefaultRego(t *testing.T) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(1, 2))
	pick := func(xs ...string) string { return xs[r.IntN(len(xs))] }
	reasons := []string{"", "nonce-unknown", "ek-certificate-untrusted", "quote-invalid", "csv-measurement-not-approved", "workload-evidence-missing"}
	pcrs := []string{"", "aa", "AA", "bb"}
	references := []map[string]any{nil, {"pcrs": map[string]any{"sha256": map[string]any{}}},
		{"pcrs": map[string]any{"sha256": map[string]any{"16": "aa"}}},
		{"pcrs": map[string]any{"sha256": map[string]any{"0": "AA", "16": "bb"}}}}
	for ri, ref := range references {
		rg, err := compilePolicy(ctx, "", ref)
		if err != nil {
			t.Fatal(err)
		}
		gp, err := newBuiltinPolicy(ref)
		if err != nil {
			t.Fatal(err)
		}
		for n := 0; n < 3000; n++ {
			f := &Facts{}
			f.Nonce.OK, f.Nonce.Reason = r.IntN(4) > 0, pick(reasons...)
			f.TPM.EKTrusted, f.TPM.EKReason, f.TPM.EKRevoked = r.IntN(3) > 0, pick(reasons...), r.IntN(5) == 0
			f.TPM.AKBound, f.TPM.AKReason = r.IntN(3) > 0, pick(reasons...)
			f.TPM.QuoteOK, f.TPM.QuoteReason = r.IntN(3) > 0, pick(reasons...)
			f.TPM.PCRs = map[string]string{}
			for _, i := range []string{"0", "16"} {
				if v := pick(pcrs...); v != "" {
					f.TPM.PCRs[i] = v
				}
			}
			f.CSV.ReportOK, f.CSV.Reason, f.CSV.Simulated = r.IntN(3) > 0, pick(reasons...), r.IntN(2) == 0
			f.CSV.MatchesEKClaims, f.CSV.EKClaimsReason = r.IntN(3) > 0, pick("", "csv-report-from-another-chip")
			w := &f.Workload
			w.Present, w.Required, w.ReportOK, w.Reason, w.Simulated = r.IntN(2) == 0, r.IntN(2) == 0, r.IntN(3) > 0, pick(reasons...), r.IntN(2) == 0
			want, err := rg.eval(ctx, f)
			if err != nil {
				t.Fatal(err)
			}
			got, err := gp.eval(ctx, f)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("reference %d, facts %+v:\nGo   %+v\nRego %+v", ri, f, got, want)
			}
		}
	}
}

func BenchmarkPolicy(b *testing.B) {
	ctx := context.Background()
	ref := map[string]any{"pcrs": map[string]any{"sha256": map[string]any{"16": "aa"}}}
	f := &Facts{}
	f.Nonce.OK, f.TPM.EKTrusted, f.TPM.AKBound, f.TPM.QuoteOK = true, true, true, true
	f.TPM.PCRs = map[string]string{"0": "00", "16": "aa"}
	f.CSV.ReportOK, f.CSV.MatchesEKClaims, f.CSV.Simulated = true, true, true
	rg, _ := compilePolicy(ctx, "", ref)
	gp, _ := newBuiltinPolicy(ref)
	for _, p := range []struct {
		name string
		a    appraiser
	}{{"rego", rg}, {"go", gp}} {
		b.Run(p.name, func(b *testing.B) {
			for b.Loop() {
				if _, err := p.a.eval(ctx, f); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
