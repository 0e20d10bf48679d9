// Package expiring keeps single-use entries that expire a fixed time after
// they were made (challenge nonces, pending credential activations), with
// bounds: expiry walks a queue in creation order, so no call sweeps the
// whole table, and the number of entries, in all and per source (a client
// address), is capped.
package expiring

import (
	"errors"
	"sync"
	"time"
)

// ErrFull: the table (or the caller's source's share of it) is full.
var ErrFull = errors.New("too many outstanding challenges; retry later")

// Table maps keys to single-use values. The zero value is not usable: set
// TTL and Max. It is safe for concurrent use.
type Table[V any] struct {
	TTL time.Duration
	// Max bounds the entries; MaxPerSource bounds one source's (0: Max).
	Max, MaxPerSource int
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time

	mu       sync.Mutex
	entries  map[string]entry[V]
	queue    []queued // in creation (and so expiry) order
	head     int
	bySource map[string]int
}

type entry[V any] struct {
	v       V
	source  string
	expires time.Time
}

type queued struct {
	key     string
	expires time.Time
}

func (t *Table[V]) now() time.Time {
	if t.Now != nil {
		return t.Now()
	}
	return time.Now()
}

// expireLocked drops entries whose time is up, from the front of the
// queue only.
func (t *Table[V]) expireLocked(now time.Time) {
	for t.head < len(t.queue) && !now.Before(t.queue[t.head].expires) {
		q := t.queue[t.head]
		t.queue[t.head] = queued{}
		t.head++
		if e, ok := t.entries[q.key]; ok && e.expires.Equal(q.expires) {
			t.dropLocked(q.key, e)
		}
	}
	// Reclaim the consumed front now and then.
	if t.head > 1024 && t.head*2 > len(t.queue) {
		t.queue = append([]queued(nil), t.queue[t.head:]...)
		t.head = 0
	}
}

func (t *Table[V]) dropLocked(key string, e entry[V]) {
	delete(t.entries, key)
	if n := t.bySource[e.source] - 1; n > 0 {
		t.bySource[e.source] = n
	} else {
		delete(t.bySource, e.source)
	}
}

// Put stores v under key for TTL, counted against source.
func (t *Table[V]) Put(key, source string, v V) error {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.entries == nil {
		t.entries, t.bySource = map[string]entry[V]{}, map[string]int{}
	}
	t.expireLocked(now)
	perSource := t.MaxPerSource
	if perSource <= 0 {
		perSource = t.Max
	}
	// The queue also holds entries already taken: bound it too.
	if len(t.entries) >= t.Max || t.bySource[source] >= perSource || len(t.queue)-t.head >= 2*t.Max {
		return ErrFull
	}
	exp := now.Add(t.TTL)
	t.entries[key] = entry[V]{v: v, source: source, expires: exp}
	t.bySource[source]++
	t.queue = append(t.queue, queued{key: key, expires: exp})
	return nil
}

// Take removes key's entry and returns its value; ok is false for an
// unknown (or already taken) key, expired reports one whose time was up.
func (t *Table[V]) Take(key string) (v V, ok, expired bool) {
	now := t.now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e, found := t.entries[key]
	if !found {
		return v, false, false
	}
	t.dropLocked(key, e)
	if !now.Before(e.expires) {
		return v, false, true
	}
	return e.v, true, false
}

// Len is the number of outstanding entries (expired ones not yet dropped
// included).
func (t *Table[V]) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.entries)
}
