package verifier

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
)

// ParseReference reads reference values for the built-in policy
// (default.rego):
//
//	{"pcrs": {"sha256": {"16": "<64 hex digits>", ...}}}
//
// Anything else is refused with the field and the reason: an unknown key
// (e.g. "pcr") or a malformed value would otherwise leave the check it was
// meant for silently undone.
func ParseReference(b []byte) (map[string]any, error) {
	var ref struct {
		PCRs map[string]map[string]string `json:"pcrs"`
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&ref); err != nil {
		return nil, fmt.Errorf("reference values: %w (want {\"pcrs\": {\"sha256\": {\"16\": \"<hex>\"}}})", err)
	}
	if len(ref.PCRs) == 0 {
		return nil, fmt.Errorf(`reference values: no "pcrs": the file would check nothing`)
	}
	pcrs := map[string]any{}
	for bank, values := range ref.PCRs {
		if bank != "sha256" {
			return nil, fmt.Errorf("reference values: pcrs.%s: the policy appraises the sha256 bank only", bank)
		}
		out := map[string]any{}
		for idx, v := range values {
			if n, err := strconv.Atoi(idx); err != nil || n < 0 || n > 23 || strconv.Itoa(n) != idx {
				return nil, fmt.Errorf("reference values: pcrs.sha256.%q: not a PCR index 0-23", idx)
			}
			if raw, err := hex.DecodeString(v); err != nil || len(raw) != 32 {
				return nil, fmt.Errorf("reference values: pcrs.sha256.%s: %q is not 64 hex digits (a SHA-256 value)", idx, v)
			}
			out[idx] = v
		}
		pcrs[bank] = out
	}
	return map[string]any{"pcrs": pcrs}, nil
}
