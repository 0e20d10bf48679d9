package verifier

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"

	"github.com/google/go-attestation/attest"
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

// ReferenceFromEventLog derives reference values from a known-good boot's
// TCG event log (the firmware's, /sys/kernel/security/tpm0/
// binary_bios_measurements, plus whatever was measured after it): it
// replays the SHA-256 digests of the log into PCR values and returns the
// reference file ParseReference reads, for the PCRs in pcrs (every PCR
// the log extends if pcrs is empty). An operator then need not write PCR
// values by hand; a later boot that measures anything else differs.
func ReferenceFromEventLog(log []byte, pcrs []int) ([]byte, error) {
	el, err := attest.ParseEventLog(log)
	if err != nil {
		return nil, fmt.Errorf("event log: %w", err)
	}
	values := map[int][]byte{}
	for n, e := range el.Events(attest.HashSHA256) {
		if e.Index < 0 || e.Index > 23 {
			return nil, fmt.Errorf("event log: event for PCR %d", e.Index)
		}
		if e.Type == evNoAction {
			// Not extended; the StartupLocality event sets PCR 0's
			// initial value (an H-CRTM or locality-3 start).
			if e.Index == 0 && bytes.HasPrefix(e.Data, []byte("StartupLocality\x00")) && len(e.Data) == len("StartupLocality\x00")+1 {
				v := make([]byte, sha256.Size)
				v[len(v)-1] = e.Data[len(e.Data)-1]
				values[0] = v
			}
			continue
		}
		if len(e.Digest) != sha256.Size {
			return nil, fmt.Errorf("event log: event %d has a %d-byte SHA-256 digest", n, len(e.Digest))
		}
		v, ok := values[e.Index]
		if !ok {
			v = make([]byte, sha256.Size)
		}
		h := sha256.New()
		h.Write(v)
		h.Write(e.Digest)
		values[e.Index] = h.Sum(nil)
	}
	if len(pcrs) == 0 {
		for i := range values {
			pcrs = append(pcrs, i)
		}
		slices.Sort(pcrs)
	}
	out := map[string]string{}
	for _, i := range pcrs {
		v, ok := values[i]
		if !ok {
			return nil, fmt.Errorf("the event log extends no PCR %d", i)
		}
		out[strconv.Itoa(i)] = hex.EncodeToString(v)
	}
	return json.MarshalIndent(map[string]any{"pcrs": map[string]any{"sha256": out}}, "", "  ")
}

// evNoAction is EV_NO_ACTION: an event that extends nothing.
const evNoAction = 3
