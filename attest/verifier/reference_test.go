package verifier

import (
	"bytes"
	"strings"
	"testing"

	"cvtpm/guestkit"
)

func TestParseReference(t *testing.T) {
	good := strings.Repeat("ab", 32)
	if ref, err := ParseReference([]byte(`{"pcrs": {"sha256": {"16": "` + good + `"}}}`)); err != nil || ref["pcrs"].(map[string]any)["sha256"].(map[string]any)["16"] != good {
		t.Fatalf("good reference: %v, %v", ref, err)
	}
	for _, tc := range []struct{ in, want string }{
		{`{"pcr": {"sha256": {"16": "` + good + `"}}}`, `unknown field "pcr"`},
		{`{"pcrs": {"sha256": {"16": "zz"}}}`, "not 64 hex digits"},
		{`{"pcrs": {"sha256": {"16": "abcd"}}}`, "not 64 hex digits"},
		{`{"pcrs": {"sha256": {"24": "` + good + `"}}}`, "not a PCR index"},
		{`{"pcrs": {"sha256": {"016": "` + good + `"}}}`, "not a PCR index"},
		{`{"pcrs": {"sha1": {"16": "` + good + `"}}}`, "sha256 bank only"},
		{`{}`, "would check nothing"},
		{`[]`, "reference values"},
	} {
		if _, err := ParseReference([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.in, err, tc.want)
		}
	}
}

func FuzzReferenceFromEventLog(f *testing.F) {
	f.Add([]byte{})
	f.Add(guestkit.NewEventLog().Bytes()) // the crypto-agile header alone
	f.Fuzz(func(t *testing.T, log []byte) {
		out, err := ReferenceFromEventLog(log, nil)
		if err == nil {
			if _, err := ParseReference(out); err != nil && len(out) > 0 && !bytes.Contains(out, []byte(`"sha256": {}`)) {
				t.Fatalf("a derived reference does not parse: %v\n%s", err, out)
			}
		}
	})
}
