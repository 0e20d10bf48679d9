package ca

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	capb "cvtpm/api/ca"
	"cvtpm/enroll"
)

// BenchmarkEnroll measures enrollments at the CA (in process, and BenchmarkEnrollGRPC through its gRPC API on loopback) with 64 concurrent
// clients and a warm chain cache: CSV verification, policy, EK certificate
// signing, the bbolt record and the synced audit line. Requests (nonce,
// simulated report) are made before the timer starts. Reports
// enrollments/s and the p99 latency.
func BenchmarkEnroll(b *testing.B) { benchEnroll(b, false) }

// BenchmarkEnrollGRPC is BenchmarkEnroll through the gRPC API over
// loopback TCP, one connection per client.
func BenchmarkEnrollGRPC(b *testing.B) { benchEnroll(b, true) }

func benchEnroll(b *testing.B, viaGRPC bool) {
	f := newFixture(b, true)
	st, err := OpenBoltStore(filepath.Join(b.TempDir(), "ca.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	f.auth.Store = st
	eks := make([][]byte, 64)
	for i := range eks {
		eks[i] = ekArea(b)
	}
	reqs := make([]struct {
		instance  string
		ek, nonce []byte
		report    []byte
	}, b.N)
	for i := range reqs {
		id := fmt.Sprintf("vm-%d", i)
		n := f.challenge(b)
		r := f.request(b, id, eks[i%len(eks)], n, id)
		reqs[i].instance, reqs[i].ek, reqs[i].nonce, reqs[i].report = id, r.EKPublicArea, n, r.Report
	}
	// Warm the chain cache.
	f.auth.Verifier.Verify(context.Background(), reqs[0].report, nil)
	do := func(ctx context.Context, r enroll.Request) error {
		_, err := f.auth.Enroll(ctx, r)
		return err
	}
	if viaGRPC {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		gs := grpc.NewServer()
		(&Server{Authority: f.auth, Log: slog.New(slog.DiscardHandler)}).Register(gs)
		go gs.Serve(ln)
		defer gs.Stop()
		var conns []Client
		for range 64 {
			conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				b.Fatal(err)
			}
			defer conn.Close()
			conns = append(conns, Client{C: capb.NewCAClient(conn)})
		}
		var rr atomic.Int64
		do = func(ctx context.Context, r enroll.Request) error {
			_, err := conns[rr.Add(1)%int64(len(conns))].Enroll(ctx, r)
			return err
		}
	}
	lat := make([]time.Duration, b.N)
	var next atomic.Int64
	b.SetParallelism(32) // 32 x GOMAXPROCS(2) = 64 clients
	b.ResetTimer()
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			i := next.Add(1) - 1
			q := reqs[i]
			t0 := time.Now()
			if err := do(context.Background(), enrollReq(q.instance, q.ek, q.nonce, q.report)); err != nil {
				b.Error(err)
				return
			}
			lat[i] = time.Since(t0)
		}
	})
	elapsed := time.Since(start)
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "enrollments/s")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
}

func enrollReq(id string, ek, nonce, report []byte) enroll.Request {
	return enroll.Request{InstanceID: id, EKPublicArea: ek, Nonce: nonce, Report: report}
}
