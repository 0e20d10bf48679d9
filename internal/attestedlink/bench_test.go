package attestedlink

import (
	"context"
	"testing"
)

// BenchmarkCall is one small call over an attested session on loopback
// TCP with a handler that answers at once: the link's own cost.
func BenchmarkCall(b *testing.B) {
	f := newFixture(b, 0x7)
	s, err := f.dial(b, f.addr, f.policy)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	req := make([]byte, 22)
	b.ResetTimer()
	for range b.N {
		if _, err := s.Call(context.Background(), "vm1", req); err != nil {
			b.Fatal(err)
		}
	}
}
