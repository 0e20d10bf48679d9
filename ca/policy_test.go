package ca

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadPolicyRefuses(t *testing.T) {
	for _, tc := range []struct{ name, json, want string }{
		{"unknown field", `{"aproved_measurements": []}`, "unknown field"},
		{"bad measurement", `{"approved_measurements": ["abc"]}`, "want 64 hex digits"},
		{"bad min_api", `{"min_api": "one"}`, "want major.minor"},
		{"bad reenroll", `{"reenroll": "sometimes"}`, "want same-ek, any or never"},
		{"missing root file", `{"simulator_roots": ["/nonexistent/hrk.cert"]}`, "simulator root"},
		{"not json", `{`, "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "policy.json")
			os.WriteFile(p, []byte(tc.json), 0o600)
			if _, err := LoadPolicy(p); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	p := filepath.Join(t.TempDir(), "policy.json")
	os.WriteFile(p, []byte(`{"approved_measurements": ["`+strings.Repeat("ab", 32)+`"], "min_api": "1.2"}`), 0o600)
	pol, err := LoadPolicy(p)
	if err != nil || pol.Reenroll != "same-ek" || len(pol.TrustedRoots()) != 1 {
		t.Fatalf("good policy: %+v %v", pol, err)
	}
}

// A policy file is outside input (an operator's file): no content crashes
// the loader, and what loads is consistent.
func FuzzLoadPolicy(f *testing.F) {
	f.Add([]byte(`{"approved_measurements": ["` + strings.Repeat("ab", 32) + `"], "allow_debug": true, "min_api": "1.2", "reenroll": "any"}`))
	f.Add([]byte(`{"deny_chips": ["X"], "allow_chips": []}`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "policy.json")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Skip()
		}
		pol, err := LoadPolicy(p)
		if err != nil {
			return
		}
		switch pol.Reenroll {
		case "same-ek", "any", "never":
		default:
			t.Fatalf("loaded reenroll %q", pol.Reenroll)
		}
		if len(pol.TrustedRoots()) < 1 {
			t.Fatal("no trusted root after loading")
		}
	})
}
