package csv

import (
	"context"
	"testing"

	"github.com/emmansun/gmsm/sm2"
)

// BenchmarkVerifyReport verifies the real report with a warm chain cache:
// per report that is PEK-by-CEK and report-by-PEK signatures plus the MAC.
func BenchmarkVerifyReport(b *testing.B) {
	v := realVerifier(b)
	rep := readVector(b, "report.cert")
	ctx := context.Background()
	if _, err := v.Verify(ctx, rep, nil); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, rep, nil); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSM2Verify is one bare gmsm SM2 verification with a user id, the
// floor of BenchmarkVerifyReport (which does two).
func BenchmarkSM2Verify(b *testing.B) {
	key, err := sm2.GenerateKey(randReader)
	if err != nil {
		b.Fatal(err)
	}
	msg := make([]byte, v1SignedLen)
	uid := []byte("HYGON-SSD-PEK")
	sig, err := key.SignWithSM2(randReader, uid, msg)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if !sm2.VerifyASN1WithSM2(&key.PublicKey, uid, msg, sig) {
			b.Fatal("verify failed")
		}
	}
}
