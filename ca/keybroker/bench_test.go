package keybroker

import (
	"context"
	"testing"
	"time"
)

// BenchmarkRelease is one full key release: challenge, a CSV report from
// the simulator, the broker's verification and policy, ECDH wrap, CA
// signature, and the backend's check and unwrap (bbolt store, in process).
// `make bench` reports it as releases per second.
func BenchmarkRelease(b *testing.B) {
	f := newFixture(b, boltStore(b), false)
	c := f.client(f.sim)
	ctx := context.Background()
	if _, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := c.Release(ctx, "backend-a", "prod", "aes-256-gcm"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "releases/s")
}
