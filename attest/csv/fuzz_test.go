package csv

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// seedVectors adds every shared real vector plus some short and wrong-size
// inputs to the fuzz corpus.
func seedVectors(f *testing.F) {
	for _, name := range []string{"hrk.cert", "hsk.cert", "cek.cert", "hsk_cek.cert", "report.cert"} {
		if b, err := os.ReadFile(filepath.Join(vectors, name)); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte{})
	f.Add(make([]byte, WrapperSize))
	f.Add(append(append(ExtMagic[:], 1, 0, 0, 0), make([]byte, ReportPage)...))
	f.Add(make([]byte, ReportPage))
}

func FuzzParseCACert(f *testing.F) {
	seedVectors(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCACert(b)
		if err != nil {
			return
		}
		if !bytes.Equal(c.Marshal(), b) {
			t.Fatal("CA certificate does not round-trip")
		}
		_, _ = c.UID()
		_, _ = c.PubKey.ECDSA()
	})
}

func FuzzParseCSVCert(f *testing.F) {
	seedVectors(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := ParseCSVCert(b)
		if err != nil {
			return
		}
		if !bytes.Equal(c.Marshal(), b) {
			t.Fatal("CSV certificate does not round-trip")
		}
		_, _ = c.UID()
		_, _ = c.PubKey.ECDSA()
	})
}

func FuzzParseHSKCEK(f *testing.F) {
	seedVectors(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, c, err := ParseHSKCEK(b)
		if err != nil {
			return
		}
		if !bytes.Equal(MarshalHSKCEK(h, c), b) {
			t.Fatal("HSK+CEK bundle does not round-trip")
		}
	})
}

func FuzzParseReport(f *testing.F) {
	seedVectors(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseReport(b)
		if err != nil {
			return
		}
		if !bytes.Equal(r.Marshal(), b) {
			t.Fatal("report does not round-trip")
		}
		_ = r.ComputeMAC()
		_ = r.ChipSerial()
	})
}

// FuzzVerify feeds arbitrary reports to a verifier holding the real chain:
// nothing may panic, and nothing but the real report may verify.
func FuzzVerify(f *testing.F) {
	seedVectors(f)
	real, _ := os.ReadFile(filepath.Join(vectors, "report.cert"))
	v := realVerifier(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := v.Verify(context.Background(), b, nil); err == nil && !bytes.Equal(b, real) {
			r, _ := ParseReport(b)
			rr, _ := ParseReport(real)
			// Only bytes outside signed/MAC-covered regions (the tail, the
			// padding of unused fields) may differ.
			if r == nil || rr == nil || !bytes.Equal(r.SignedBytes(), rr.SignedBytes()) || r.MAC != rr.MAC {
				t.Fatalf("a different report verified")
			}
		}
	})
}
