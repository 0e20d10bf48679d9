// Package logfield keeps what clients send from filling logs: long values
// are clipped (with their length and digest, so they stay recognisable)
// and repeated refusals from one source are rate-limited.
package logfield

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// MaxLen is the longest value Clip passes unchanged.
const MaxLen = 256

// Clip returns s if it is at most MaxLen bytes, else its first 96 bytes
// followed by its length and the start of its SHA-256.
func Clip(s string) string {
	if len(s) <= MaxLen {
		return s
	}
	head := s[:96]
	for !utf8.ValidString(head) && len(head) > 0 {
		head = head[:len(head)-1]
	}
	sum := sha256.Sum256([]byte(s))
	return fmt.Sprintf("%s… (%d bytes, sha256 %s…)", strings.ToValidUTF8(head, "?"), len(s), hex.EncodeToString(sum[:8]))
}

// Limiter lets through at most Burst log lines per source in each Window
// (defaults 10 and 10 s); Allow also says how many were held back since
// the last line it let through, to be logged with it.
type Limiter struct {
	Burst  int
	Window time.Duration

	mu      sync.Mutex
	sources map[string]*window
}

type window struct {
	start      time.Time
	n          int
	suppressed int
}

// Allow reports whether a line for source may be logged now, and how many
// were suppressed before it.
func (l *Limiter) Allow(source string) (ok bool, suppressed int) {
	burst, win := l.Burst, l.Window
	if burst <= 0 {
		burst = 10
	}
	if win <= 0 {
		win = 10 * time.Second
	}
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sources == nil || len(l.sources) > 10_000 {
		l.sources = map[string]*window{}
	}
	w := l.sources[source]
	if w == nil || now.Sub(w.start) > win {
		prev := 0
		if w != nil {
			prev = w.suppressed
		}
		w = &window{start: now}
		l.sources[source] = w
		w.n = 1
		return true, prev
	}
	if w.n >= burst {
		w.suppressed++
		return false, 0
	}
	w.n++
	s := w.suppressed
	w.suppressed = 0
	return true, s
}
