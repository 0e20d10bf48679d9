package verifier

import (
	"bytes"
	"errors"
	"os"
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
	if real, err := os.ReadFile("testdata/ovmf-direct-boot.log"); err == nil {
		f.Add(real)
	}
	f.Fuzz(func(t *testing.T, log []byte) {
		// The kernel checks read the same log: no panic, a match only
		// for what was measured.
		if CheckKernelCmdline(log, "x") == nil {
			t.Fatal(`a log measured the command line "x"`)
		}
		CheckInitrd(log, nil)
		out, err := ReferenceFromEventLog(log, nil)
		if err == nil {
			if _, err := ParseReference(out); err != nil && len(out) > 0 && !bytes.Contains(out, []byte(`"sha256": {}`)) {
				t.Fatalf("a derived reference does not parse: %v\n%s", err, out)
			}
		}
	})
}

// A real OVMF direct kernel boot's log names the command line it measured
// (testdata/README.md says which boot).
func TestCheckKernelCmdline(t *testing.T) {
	log, err := os.ReadFile("testdata/ovmf-direct-boot.log")
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckKernelCmdline(log, "console=ttyS0 panic=-1 quiet initrd=initrd"); err != nil {
		t.Fatal(err)
	}
	for _, other := range []string{"console=ttyS0 panic=-1 quiet", "console=ttyS0 panic=-1 quiet initrd=initrd init=/bin/sh", ""} {
		if err := CheckKernelCmdline(log, other); err == nil || !strings.Contains(err.Error(), "is not") {
			t.Errorf("command line %q: %v", other, err)
		}
	}
	if err := CheckInitrd(log, []byte("not the initrd")); err == nil {
		t.Error("another initrd matched")
	}
	// A log without the stub's events (cvtpm guest measure's) says so.
	if _, err := linuxTagged(guestkit.NewEventLog().Bytes(), tagLinuxLoadOptions); !errors.Is(err, ErrNotMeasured) {
		t.Errorf("a log without kernel measurements: %v", err)
	}
	// And the reference values of that boot replay from it.
	if _, err := ReferenceFromEventLog(log, []int{0, 1, 2, 3, 4, 5, 6, 7, 9}); err != nil {
		t.Fatal(err)
	}
}
