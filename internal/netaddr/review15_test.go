package netaddr

import (
	"fmt"
	"testing"
)

// Review 15, finding 7: a "source" is the full IP address. An IPv6 client
// owns at least a /64 (2^64 addresses), so one attacker takes every slot of
// a serve.Listen listener (1024 in all, "64 per source") and every other
// client is refused: the per-source share does not bound it. (Likewise a
// local client can use any of 127.0.0.0/8.)
func TestReview15PerSourceCapBypassedByIPv6Prefix(t *testing.T) {
	l := &Limits{Max: 1024, MaxPerSource: 64}
	admitted := 0
	for i := range 1024 {
		if l.Admit(fmt.Sprintf("2001:db8:1:2::%x", i+1)) {
			admitted++
		}
	}
	if admitted > 64 {
		t.Fatalf("one /64 got %d connections (per-source cap 64); another client is now refused: %v",
			admitted, !l.Admit("198.51.100.1"))
	}
}
