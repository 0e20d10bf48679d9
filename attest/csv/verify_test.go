package csv

import (
	"bytes"
	"context"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
)

// vectors is the shared folder of real HYGON evidence (see its README).
const vectors = "../../../shared/testdata/csv"

func readVector(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(vectors, name))
	if err != nil {
		t.Fatalf("test vector: %v", err)
	}
	return b
}

func realVerifier(t testing.TB) *Verifier {
	hsk, cek, err := ParseHSKCEK(readVector(t, "hsk_cek.cert"))
	if err != nil {
		t.Fatal(err)
	}
	return NewVerifier(VerifierOptions{Certs: StaticSource{hsk, cek}})
}

func TestRealReportVerifies(t *testing.T) {
	v := realVerifier(t)
	var rd [64]byte
	copy(rd[:], "user data")
	c, err := v.Verify(context.Background(), readVector(t, "report.cert"), rd[:])
	if err != nil {
		t.Fatal(err)
	}
	wantMN, _ := hex.DecodeString("67c6697351ff4aec29cdbaabf2fbe346")
	wantMeasure, _ := hex.DecodeString("1178dadbf826ec7a07444ba358376d81c312cb53d703f9da83b26c1eee2ea052")
	switch {
	case c.Version != 1:
		t.Errorf("version %d", c.Version)
	case c.Policy.Raw != 0x40000001 || !c.Policy.NoDebug || c.Policy.APIMinor != 0x40:
		t.Errorf("policy %+v", c.Policy)
	case c.ChipSerial != "NZA9T14052605":
		t.Errorf("chip serial %q", c.ChipSerial)
	case !bytes.Equal(c.ReportData, rd[:]):
		t.Errorf("report_data %x", c.ReportData)
	case !bytes.Equal(c.MNonce, wantMN):
		t.Errorf("mnonce %x", c.MNonce)
	case !bytes.Equal(c.Measure, wantMeasure):
		t.Errorf("measure %x", c.Measure)
	case c.Simulated || c.Root.Name != "HYGON HRK":
		t.Errorf("root %+v simulated %v", c.Root, c.Simulated)
	}
	t.Logf("claims: %+v", c)
}
