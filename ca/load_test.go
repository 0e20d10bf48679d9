package ca

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	capb "cvtpm/api/ca"
)

// BenchmarkLoadOutstanding is the CA under an unauthenticated flood, as
// deployed: the gRPC API over TLS on loopback, bbolt store, synced audit
// log. It measures Challenge and Enroll latency (median of sequential
// calls) on an idle CA, then leaves 100,000 challenges outstanding (what a
// client that asks and never enrolls does) and measures again; it reports
// both, their ratios (the goal is at most 2) and the heap the outstanding
// challenges hold. The next challenge beyond the table's cap is refused
// with RESOURCE_EXHAUSTED.
func BenchmarkLoadOutstanding(b *testing.B) {
	const outstanding = 100_000
	f := newFixture(b, true)
	st, err := OpenBoltStore(filepath.Join(b.TempDir(), "ca.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	f.auth.Store = st
	f.auth.MaxOutstanding, f.auth.MaxPerSource = outstanding+1000, outstanding+1000 // loopback is one source
	f.clock = time.Time{}
	f.auth.Now = nil
	service := testIssuer(b, PurposeService)
	tlsConf, err := ServerTLS(service, []string{"127.0.0.1"}, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsConf)))
	(&Server{Authority: f.auth, Log: slog.New(slog.DiscardHandler)}).Register(gs)
	go gs.Serve(ln)
	defer gs.Stop()
	pin, _ := ParseFingerprint(Fingerprint(service.DER()))
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(ClientTLS(pin))))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c := Client{C: capb.NewCAClient(conn)}
	ctx := context.Background()
	ek := ekArea(b)
	const samples = 200
	instance := 0
	measure := func() (challenge, enroll time.Duration) {
		var cl, el []time.Duration
		for range samples {
			t0 := time.Now()
			n, err := c.Challenge(ctx)
			if err != nil {
				b.Fatal(err)
			}
			cl = append(cl, time.Since(t0))
			instance++
			id := fmt.Sprintf("vm-%d", instance)
			req := f.request(b, id, ek, n, id) // the report is made before the clock starts
			t0 = time.Now()
			if _, err := c.Enroll(ctx, req); err != nil {
				b.Fatal(err)
			}
			el = append(el, time.Since(t0))
		}
		slices.Sort(cl)
		slices.Sort(el)
		return cl[samples/2], el[samples/2]
	}
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	for range b.N {
		measure() // warm: connections, chain cache
		idleC, idleE := measure()
		before := heap()
		var wg sync.WaitGroup
		for w := range 16 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < outstanding; i += 16 {
					if _, err := c.Challenge(ctx); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		held := heap() - before
		loadC, loadE := measure()
		// Fill to the cap: the next challenge is refused, by name.
		for {
			_, err := c.Challenge(ctx)
			if status.Code(err) == codes.ResourceExhausted {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(idleC.Microseconds()), "challenge-idle-us")
		b.ReportMetric(float64(loadC.Microseconds()), "challenge-100k-us")
		b.ReportMetric(float64(loadC)/float64(idleC), "challenge-ratio")
		b.ReportMetric(float64(idleE.Microseconds())/1000, "enroll-idle-ms")
		b.ReportMetric(float64(loadE.Microseconds())/1000, "enroll-100k-ms")
		b.ReportMetric(float64(loadE)/float64(idleE), "enroll-ratio")
		b.ReportMetric(float64(held)/(1<<20), "heap-MiB-100k")
	}
}
