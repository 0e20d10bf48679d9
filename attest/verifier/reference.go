package verifier

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"unicode/utf16"

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

// The Linux EFI stub (5.19 and later) measures what it loads into PCR 9 as
// EV_EVENT_TAG events (TCG_PCClientTaggedEvent: tag id, size, description)
// whose SHA-256 digest is of the thing itself: the command line as UTF-16LE
// with its NUL, and the initrd file.
const (
	evEventTag            = 6
	tagLinuxLoadOptions   = 0x8F3B22ED
	tagLinuxInitrd        = 0x8F3B22EC
	linuxKernelMeasurePCR = 9
)

// ErrNotMeasured: the log has no such measurement (another bootloader, or
// a kernel older than 5.19).
var ErrNotMeasured = errors.New("not measured in the event log")

// linuxTagged returns the SHA-256 digest of the Linux EFI stub's tagged
// event tag in log.
func linuxTagged(log []byte, tag uint32) ([]byte, error) {
	el, err := attest.ParseEventLog(log)
	if err != nil {
		return nil, fmt.Errorf("event log: %w", err)
	}
	var found []byte
	for _, e := range el.Events(attest.HashSHA256) {
		if e.Index != linuxKernelMeasurePCR || e.Type != evEventTag || len(e.Data) < 8 || binary.LittleEndian.Uint32(e.Data) != tag {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("event log: two Linux EFI stub events with tag %#x in PCR %d", tag, linuxKernelMeasurePCR)
		}
		found = e.Digest
	}
	if found == nil {
		return nil, ErrNotMeasured
	}
	return found, nil
}

// CheckKernelCmdline reports whether the known-good log measured exactly
// this kernel command line (as the firmware passed it: OVMF's direct
// kernel boot appends " initrd=initrd"), so an operator knows what the
// reference values stand for. The log holds only its digest.
func CheckKernelCmdline(log []byte, cmdline string) error {
	got, err := linuxTagged(log, tagLinuxLoadOptions)
	if err != nil {
		return fmt.Errorf("kernel command line: %w", err)
	}
	buf := make([]byte, 0, 2*len(cmdline)+2)
	for _, c := range utf16.Encode([]rune(cmdline)) {
		buf = binary.LittleEndian.AppendUint16(buf, c)
	}
	want := sha256.Sum256(append(buf, 0, 0))
	if !bytes.Equal(got, want[:]) {
		return fmt.Errorf("the kernel command line measured in PCR %d is not %q", linuxKernelMeasurePCR, cmdline)
	}
	return nil
}

// CheckInitrd reports whether the known-good log measured exactly this
// initrd.
func CheckInitrd(log, initrd []byte) error {
	got, err := linuxTagged(log, tagLinuxInitrd)
	if err != nil {
		return fmt.Errorf("initrd: %w", err)
	}
	if want := sha256.Sum256(initrd); !bytes.Equal(got, want[:]) {
		return fmt.Errorf("the initrd measured in PCR %d is another (SHA-256 %x)", linuxKernelMeasurePCR, got)
	}
	return nil
}
