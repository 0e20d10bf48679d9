package logfield

import (
	"strings"
	"testing"
)

func TestClip(t *testing.T) {
	for _, tc := range []struct {
		in      string
		maxOut  int
		same    bool
		mention string
	}{
		{"vm-1", 10, true, ""},
		{strings.Repeat("x", MaxLen), MaxLen, true, ""},
		{strings.Repeat("x", 3<<20), 200, false, "3145728 bytes"},
		{strings.Repeat("é", 200), 200, false, "400 bytes"},
	} {
		got := Clip(tc.in)
		if (got == tc.in) != tc.same || len(got) > tc.maxOut || !strings.Contains(got, tc.mention) {
			t.Errorf("Clip(%d bytes) = %q", len(tc.in), got)
		}
	}
}

func TestLimiter(t *testing.T) {
	var l Limiter
	allowed := 0
	for range 100 {
		if ok, _ := l.Allow("10.0.0.1"); ok {
			allowed++
		}
	}
	if allowed != 10 {
		t.Fatalf("allowed %d of 100 in one window, want 10", allowed)
	}
	if ok, _ := l.Allow("10.0.0.2"); !ok {
		t.Fatal("another source was held back")
	}
}
