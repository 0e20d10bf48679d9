package csv

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func TestHTTPSourceAndCache(t *testing.T) {
	bundle := readVector(t, "hsk_cek.cert")
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		switch {
		case r.URL.Path != "/hsk_cek":
			http.NotFound(w, r)
		case r.URL.Query().Get("snumber") == "NZA9T14052605":
			w.Write(bundle)
		case r.URL.Query().Get("snumber") == "SHORT":
			w.Write(bundle[:100])
		case r.URL.Query().Get("snumber") == "SLOW":
			<-r.Context().Done()
		default:
			http.Error(w, "unknown chip", http.StatusNotFound)
		}
	}))
	defer srv.Close()
	now := time.Unix(1000, 0)
	src := &CachedSource{Source: HTTPSource{BaseURL: srv.URL + "/", Timeout: 200 * time.Millisecond}, TTL: time.Minute, Now: func() time.Time { return now }}
	ctx := context.Background()

	tests := []struct {
		serial   string
		wantErr  bool
		wantHits int32 // total server hits after the call
	}{
		{"NZA9T14052605", false, 1},
		{"NZA9T14052605", false, 1}, // cached
		{"UNKNOWN", true, 2},
		{"UNKNOWN", true, 3}, // failures are not cached
		{"SHORT", true, 4},
		{"SLOW", true, 5},
		{"../etc", true, 5}, // refused before any request
	}
	for _, tc := range tests {
		hsk, cek, err := src.HSKCEK(ctx, tc.serial)
		if (err != nil) != tc.wantErr || hits.Load() != tc.wantHits {
			t.Fatalf("%s: err %v hits %d, want err=%v hits %d", tc.serial, err, hits.Load(), tc.wantErr, tc.wantHits)
		}
		if err == nil && (hsk.Usage != UsageHSK || cek.KeyUsage != UsageCEK) {
			t.Fatalf("%s: wrong certificates", tc.serial)
		}
	}
	now = now.Add(2 * time.Minute) // expired: fetched again
	if _, _, err := src.HSKCEK(ctx, "NZA9T14052605"); err != nil || hits.Load() != 6 {
		t.Fatalf("after TTL: err %v hits %d", err, hits.Load())
	}
	// The whole verifier over the KDS.
	v := NewVerifier(VerifierOptions{Certs: src})
	if _, err := v.Verify(ctx, readVector(t, "report.cert"), nil); err != nil {
		t.Fatal(err)
	}
}
