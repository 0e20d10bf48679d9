package ca

import (
	"os"
	"testing"

	"cvtpm/enroll"
)

// Review 15, finding 2: every refused request of an unauthenticated client
// (an AKCertify with a made-up challenge id, an empty Enroll) appends a
// synced line to the audit log. Fields are clipped, but the number of lines
// is the attacker's to choose: one source fills the CA's disk (and keeps
// its fsync busy) at its request rate. Nothing rate-limits, aggregates or
// caps these refusal records.
func TestReview15AuditGrowsWithUnauthenticatedRefusals(t *testing.T) {
	f := newFixture(t, true)
	ctx := fromSource("203.0.113.7")
	flood := func(n int) int64 {
		for range n {
			f.auth.AKCertify(ctx, "00000000000000000000000000000000", nil)
			f.auth.Enroll(ctx, enroll.Request{})
		}
		st, err := os.Stat(f.auditPath)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	s1 := flood(500)
	s2 := flood(500)
	if s2 > s1+4096 {
		t.Fatalf("audit log: %d bytes after 1000 unauthenticated refusals, %d after 2000: it grows by ~%d bytes per request without bound",
			s1, s2, (s2-s1)/1000)
	}
}
