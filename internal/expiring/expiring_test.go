package expiring

import (
	"errors"
	"fmt"
	"testing"
	"time"
)

func TestTable(t *testing.T) {
	now := time.Unix(1000, 0)
	tb := &Table[int]{TTL: time.Minute, Max: 4, MaxPerSource: 2, Now: func() time.Time { return now }}
	for i, src := range []string{"a", "a", "b"} {
		if err := tb.Put(fmt.Sprint(i), src, i); err != nil {
			t.Fatal(err)
		}
	}
	if err := tb.Put("x", "a", 9); !errors.Is(err, ErrFull) {
		t.Fatalf("third entry of source a: %v", err)
	}
	if v, ok, _ := tb.Take("0"); !ok || v != 0 {
		t.Fatalf("take 0: %v %v", v, ok)
	}
	if _, ok, _ := tb.Take("0"); ok {
		t.Fatal("an entry was taken twice")
	}
	if err := tb.Put("x", "a", 9); err != nil {
		t.Fatalf("source a after a take: %v", err)
	}
	now = now.Add(2 * time.Minute)
	if _, ok, expired := tb.Take("1"); ok || !expired {
		t.Fatalf("expired entry: ok %v expired %v", ok, expired)
	}
	// Expired entries leave as new ones come, without a sweep.
	if err := tb.Put("y", "c", 1); err != nil {
		t.Fatal(err)
	}
	if n := tb.Len(); n != 1 {
		t.Fatalf("%d entries after expiry, want 1", n)
	}
	tb2 := &Table[int]{TTL: time.Minute, Max: 2}
	tb2.Put("a", "", 1)
	tb2.Put("b", "", 2)
	if err := tb2.Put("c", "", 3); !errors.Is(err, ErrFull) {
		t.Fatalf("over Max: %v", err)
	}
}

// BenchmarkPutTake with 100k outstanding entries: the cost stays that of
// a map operation (no sweep).
func BenchmarkPutTake(b *testing.B) {
	tb := &Table[int]{TTL: time.Hour, Max: 1 << 20}
	for i := range 100_000 {
		tb.Put(fmt.Sprint("x", i), "", i)
	}
	b.ResetTimer()
	for i := range b.N {
		k := fmt.Sprint(i)
		tb.Put(k, "", i)
		tb.Take(k)
	}
}
