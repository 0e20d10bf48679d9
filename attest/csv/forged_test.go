package csv

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// forgeSerial rewrites a report's chip serial and recomputes its MAC, as
// anyone holding the report can: the MAC key (mnonce) is in the report.
func forgeSerial(t *testing.T, report []byte, serial string) []byte {
	t.Helper()
	r, err := ParseReport(report)
	if err != nil {
		t.Fatal(err)
	}
	r.SN = [64]byte{}
	copy(r.SN[:], serial)
	r.MAC = r.ComputeMAC()
	return r.Marshal()
}

// A denied chip's report rewritten to claim an allowed chip's serial: with
// HSK+CEK looked up by serial it fails (the allowed chip's CEK did not
// sign its PEK); only with the pair the evidence carries would it pass,
// which is why chip lists are refused in that mode.
func TestForgedChipSerial(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	sims := map[string]*Simulator{}
	var roots []string
	for _, chip := range []string{"SIMALLOWED", "SIMDENIED"} {
		s, err := NewSimulator(chip)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetVM(VMConfig{Version: 1, Policy: 0x7}); err != nil {
			t.Fatal(err)
		}
		sims[chip] = s
		os.MkdirAll(filepath.Join(dir, "hsk_cek", chip), 0o700)
		os.WriteFile(filepath.Join(dir, "hsk_cek", chip, "hsk_cek.cert"), MarshalHSKCEK(s.HSK, s.CEK), 0o600)
		root := filepath.Join(dir, chip+"-hrk.cert")
		os.WriteFile(root, s.HRK.Marshal(), 0o600)
		roots = append(roots, root)
	}
	policy := &AppraisalPolicy{SimulatorRoots: roots, DenyChips: []string{"SIMDENIED"}, ApprovedMeasurements: []string{strings.Repeat("00", 32)}}
	if err := policy.Compile(); err != nil {
		t.Fatal(err)
	}
	rd := make([]byte, 64)
	genuine, err := sims["SIMDENIED"].Report(ctx, rd)
	if err != nil {
		t.Fatal(err)
	}
	forged := forgeSerial(t, genuine, "SIMALLOWED")

	byDir, err := SelectCertSource(dir, "", false, policy)
	if err != nil {
		t.Fatal(err)
	}
	v := NewVerifier(VerifierOptions{TrustedRoots: policy.TrustedRoots(), Certs: byDir})
	// The genuine report is refused by the deny list.
	var ae *AppraisalError
	if _, err := policy.VerifyAndAppraise(ctx, v, genuine, rd); !errors.As(err, &ae) || ae.Reason != ReasonChip {
		t.Fatalf("the denied chip's genuine report: %v", err)
	}
	// The forged one fails verification: SIMALLOWED's CEK did not sign
	// SIMDENIED's PEK.
	if _, err := policy.VerifyAndAppraise(ctx, v, forged, rd); err == nil || errors.As(err, &ae) && ae.Reason == ReasonChip {
		t.Fatalf("the forged serial with HSK+CEK looked up by serial: %v", err)
	} else {
		t.Logf("forged serial refused: %v", err)
	}
	// With the pair from the evidence the forgery would pass: the
	// verifier shows why that mode refuses chip lists.
	evidencePair := NewVerifier(VerifierOptions{TrustedRoots: policy.TrustedRoots(), Certs: StaticSource{HSK: sims["SIMDENIED"].HSK, CEK: sims["SIMDENIED"].CEK}})
	if c, err := evidencePair.Verify(ctx, forged, rd); err != nil || c.ChipSerial != "SIMALLOWED" {
		t.Fatalf("expected the forged serial to pass with the evidence's own pair (the attack): %v", err)
	}
	if _, err := SelectCertSource("", "", true, policy); !errors.Is(err, ErrEvidenceCertsWithChipLists) {
		t.Fatalf("evidence HSK+CEK with chip lists: %v", err)
	}
}

func TestSelectCertSource(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "hsk_cek"), 0o700)
	for _, tc := range []struct {
		name, dir, kds string
		evidence       bool
		want           string // "" ok; else part of the error
		wantNil        bool
	}{
		{"offline directory", dir, "", false, "", false},
		{"default KDS", "", "", false, "", false},
		{"evidence", "", "", true, "", true},
		{"evidence and a directory", dir, "", true, "exclude", false},
		{"directory and KDS", dir, "https://kds.example", false, "exclude each other", false},
		{"directory without hsk_cek", t.TempDir(), "", false, "no hsk_cek", false},
	} {
		src, err := SelectCertSource(tc.dir, tc.kds, tc.evidence, &AppraisalPolicy{})
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		case tc.want == "" && (src == nil) != tc.wantNil:
			t.Errorf("%s: source %v", tc.name, src)
		}
	}
}
