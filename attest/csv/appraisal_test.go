package csv

import (
	"encoding/hex"
	"strings"
	"testing"
)

// Each policy bit the default appraisal requires, and its opt-out.
func TestAppraisePolicyBits(t *testing.T) {
	measure := strings.Repeat("ab", 32)
	claims := func(policy uint32) *Claims {
		return &Claims{Policy: DecodePolicy(policy), Measure: HexBytes(must(hex.DecodeString(measure))), ChipSerial: "C1"}
	}
	for _, tc := range []struct {
		name   string
		policy AppraisalPolicy
		word   uint32
		want   string // "" accepted
	}{
		{"CSV2 guest (NODBG, NOKS, ES)", AppraisalPolicy{}, 0x7, ""},
		{"CSV1 guest refused by default", AppraisalPolicy{}, 0x3, ReasonCSV1},
		{"CSV1 guest with allow_csv1", AppraisalPolicy{AllowCSV1: true}, 0x3, ""},
		{"debuggable", AppraisalPolicy{}, 0x6, ReasonDebug},
		{"key sharing", AppraisalPolicy{}, 0x5, ReasonKeySharing},
		{"debuggable with allow_debug", AppraisalPolicy{AllowDebug: true}, 0x6, ""},
	} {
		tc.policy.ApprovedMeasurements = []string{measure}
		err := tc.policy.Appraise(claims(tc.word))
		got := ""
		if err != nil {
			got = err.Reason
		}
		if got != tc.want {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}
