package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"cvtpm/test/testenv"
)

// Indices into a pair: cvtpm first, swtpm second, everywhere.
const (
	cv = 0
	sw = 1
)

// blocks is how many alternating blocks a benchmark's b.N operations are cut
// into per server: enough that a 2x speed drift over minutes affects both
// servers alike, few enough that a block is long compared with a time.Now.
const blocks = 40

// maxStartSamples caps process starts per server in the start benchmarks, so
// that -benchtime 2000x does not mean 4000 process starts.
const maxStartSamples = 100

// startTimeout bounds how long a server may take to accept its data socket.
const startTimeout = 30 * time.Second

var (
	workDir string // removed after the run

	pairsMu sync.Mutex
	pairs   = map[string]*pair{}

	results resultTable
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cvtpm-bench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench: create work dir:", err)
		os.Exit(2)
	}
	workDir = dir
	code := m.Run()
	pairsMu.Lock()
	for _, p := range pairs {
		for _, t := range p {
			t.close()
		}
	}
	pairsMu.Unlock()
	os.RemoveAll(dir)
	results.print(os.Stdout)
	os.Exit(code)
}

// resolveServers finds both executables through test/testenv: CVTPM_BIN (or
// a fresh build of ./cmd/cvtpm when unset) and SWTPM_BIN (or swtpm on PATH).
func resolveServers(tb testing.TB) [2]server {
	return [2]server{
		{name: "cvtpm", impl: testenv.Cvtpm, bin: testenv.Binary(tb, testenv.Cvtpm)},
		{name: "swtpm", impl: testenv.Swtpm, bin: testenv.Binary(tb, testenv.Swtpm)},
	}
}

// target is one running server with a kept-open client connection and the
// attestation keys created on it (lazily).
type target struct {
	proc         *process
	tpm          *streamTPM
	akECC, akRSA *tpm2.AuthHandle
}

func (t *target) close() {
	if t.tpm != nil {
		t.tpm.Close()
	}
	t.proc.stop()
}

type pair [2]*target

// sharedPair returns cvtpm and swtpm running with the same options on nw,
// started once per run and shared by the benchmarks. swtpm serves one data
// connection at a time, so a pair either keeps one connection open
// (keepConn) or leaves the socket free for a connection per command.
func sharedPair(b *testing.B, nw network, keepConn bool) *pair {
	srvs := resolveServers(b)
	key := fmt.Sprintf("%s-keep%v", nw, keepConn)
	pairsMu.Lock()
	defer pairsMu.Unlock()
	if p, ok := pairs[key]; ok {
		return p
	}
	var p pair
	for i, srv := range srvs {
		mode, err := benchPinMode()
		if err != nil {
			b.Fatal(err)
		}
		cpu, err := serverCPU(mode)
		if err != nil {
			b.Fatal(err)
		}
		t, err := startTarget(srv, filepath.Join(workDir, key, srv.name), nw, cpu)
		if err != nil {
			if i == sw {
				p[cv].close()
			}
			b.Fatal(err)
		}
		if !keepConn {
			t.tpm.Close()
			t.tpm = nil
		}
		p[i] = t
	}
	pairs[key] = &p
	return &p
}

func startTarget(srv server, stateDir string, nw network, cpu int) (*target, error) {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	proc, err := start(ctx, srv, stateDir, nw, cpu)
	if err != nil {
		return nil, err
	}
	c, err := dialTPM(nw, proc.addr)
	if err != nil {
		proc.stop()
		return nil, err
	}
	t := &target{proc: proc, tpm: c}
	if _, err := getRandom(c); err != nil {
		t.close()
		return nil, fmt.Errorf("%s does not answer GetRandom after start: %w", srv.name, err)
	}
	return t, nil
}

// alternate runs op b.N times against each server of p, in blocks whose
// order flips every block (cvtpm first, then swtpm first, ...). It reports,
// for each server, the median over blocks of the mean latency per operation,
// and the median of the per-block ratios: a block pair runs within a few
// milliseconds, so a drift or a hiccup of the machine skews one pair, not the
// result.
func alternate(b *testing.B, p *pair, label string, op func(t *target) error) {
	b.Helper()
	var perOp [2][]float64 // microseconds per operation, one entry per block
	var ratios []float64
	block := max(1, b.N/blocks)
	defer pinClient(b)()
	b.ResetTimer()
	for done, i := 0, 0; done < b.N; i++ {
		k := min(block, b.N-done)
		order := [2]int{cv, sw}
		if i%2 == 1 {
			order = [2]int{sw, cv}
		}
		var us [2]float64
		for _, s := range order {
			t0 := time.Now()
			for range k {
				if err := op(p[s]); err != nil {
					b.Fatalf("%s on %s: %v", label, p[s].proc.srv.name, err)
				}
			}
			us[s] = float64(time.Since(t0).Nanoseconds()) / 1e3 / float64(k)
			perOp[s] = append(perOp[s], us[s])
		}
		ratios = append(ratios, us[cv]/us[sw])
		done += k
	}
	b.StopTimer()
	report(b, label, medianFloat(perOp[cv]), medianFloat(perOp[sw]), medianFloat(ratios), "us/op")
}

// alternateTimed is alternate with blocks of a fixed duration (each
// server runs op for d, the order alternating), at least blocks of them
// and b.N operations per server in all; reported are the medians over
// blocks, as alternate's.
func alternateTimed(b *testing.B, p *pair, label string, d time.Duration, op func(t *target) error) {
	b.Helper()
	var perOp [2][]float64
	var ratios []float64
	defer pinClient(b)()
	b.ResetTimer()
	var ops [2]int
	for i := 0; i < blocks || ops[cv] < b.N || ops[sw] < b.N; i++ {
		order := [2]int{cv, sw}
		if i%2 == 1 {
			order = [2]int{sw, cv}
		}
		var us [2]float64
		for _, s := range order {
			n, t0 := 0, time.Now()
			for time.Since(t0) < d {
				if err := op(p[s]); err != nil {
					b.Fatalf("%s on %s: %v", label, p[s].proc.srv.name, err)
				}
				n++
			}
			ops[s] += n
			us[s] = float64(time.Since(t0).Nanoseconds()) / 1e3 / float64(n)
			perOp[s] = append(perOp[s], us[s])
		}
		ratios = append(ratios, us[cv]/us[sw])
	}
	b.StopTimer()
	report(b, label, medianFloat(perOp[cv]), medianFloat(perOp[sw]), medianFloat(ratios), "us/op")
}

// pinClient pins this process where CVTPM_BENCH_PIN puts the client and
// returns what undoes it.
func pinClient(b *testing.B) (restore func()) {
	b.Helper()
	mode, err := benchPinMode()
	if err != nil {
		b.Fatal(err)
	}
	cpu, err := clientCPU(mode)
	if err != nil {
		b.Fatal(err)
	}
	restore, err = pinProcess(cpu)
	if err != nil {
		b.Fatal(err)
	}
	return restore
}

func medianFloat(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// report attaches the per-server figures and their ratio to the benchmark
// and remembers them for the final table.
func report(b *testing.B, label string, cvVal, swVal, ratio float64, unit string) {
	b.ReportMetric(cvVal, "cvtpm-"+unit)
	b.ReportMetric(swVal, "swtpm-"+unit)
	b.ReportMetric(ratio, "ratio")
	results.set(label, cvVal, swVal, ratio, unit)
}

// plainRatio is cvVal/swVal, 0 when swVal is 0.
func plainRatio(cvVal, swVal float64) float64 {
	if swVal == 0 {
		return 0
	}
	return cvVal / swVal
}

func getRandom(t transport.TPM) ([]byte, error) {
	rsp, err := tpm2.GetRandom{BytesRequested: 8}.Execute(t)
	if err != nil {
		return nil, fmt.Errorf("GetRandom(8): %w", err)
	}
	if len(rsp.RandomBytes.Buffer) != 8 {
		return nil, fmt.Errorf("GetRandom(8) returned %d bytes", len(rsp.RandomBytes.Buffer))
	}
	return rsp.RandomBytes.Buffer, nil
}

// rawGetRandom8 is TPM2_GetRandom(8) as bytes: tag NO_SESSIONS, size 12,
// command code 0x17B, bytesRequested 8.
var rawGetRandom8 = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}

// sendRawGetRandom sends the prebuilt command, so only the server and the
// socket round trip are timed, not go-tpm's reflection marshalling.
func sendRawGetRandom(t transport.TPM) error {
	rsp, err := t.Send(rawGetRandom8)
	if err != nil {
		return err
	}
	// header 10, TPM2B size 2, 8 bytes; response code at [6:10] must be 0.
	if len(rsp) != 20 || !bytes.Equal(rsp[6:10], []byte{0, 0, 0, 0}) {
		return fmt.Errorf("unexpected GetRandom response % x", rsp)
	}
	return nil
}

func BenchmarkGetRandomRaw(b *testing.B) {
	p := sharedPair(b, unixNet, true)
	alternate(b, p, "GetRandom(8) raw bytes, unix", func(t *target) error { return sendRawGetRandom(t.tpm) })
}

func BenchmarkGetRandom(b *testing.B) {
	p := sharedPair(b, unixNet, true)
	alternate(b, p, "GetRandom(8) go-tpm, unix", func(t *target) error { _, err := getRandom(t.tpm); return err })
}

func BenchmarkGetRandomTCP(b *testing.B) {
	p := sharedPair(b, tcpNet, true)
	alternate(b, p, "GetRandom(8) go-tpm, tcp", func(t *target) error { _, err := getRandom(t.tpm); return err })
}

// BenchmarkGetRandomConnPerCommand follows tpm2-tss's swtpm TCTI, which opens
// a new data connection for every command.
func BenchmarkGetRandomConnPerCommand(b *testing.B) {
	p := sharedPair(b, unixNet, false)
	alternate(b, p, "GetRandom(8) conn/command, unix", func(t *target) error {
		_, err := getRandom(&connPerCommandTPM{network: t.proc.network, addr: t.proc.addr})
		return err
	})
}

// benchPCR is a debug PCR (16), resettable and unused by any measured boot.
const benchPCR = 16

func BenchmarkPCRExtend(b *testing.B) {
	p := sharedPair(b, unixNet, true)
	digest := bytes.Repeat([]byte{0x5a}, 32)
	extend := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(benchPCR), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{
			{HashAlg: tpm2.TPMAlgSHA256, Digest: digest},
		}},
	}
	alternate(b, p, "PCR_Extend sha256", func(t *target) error {
		if _, err := extend.Execute(t.tpm); err != nil {
			return fmt.Errorf("PCR_Extend(%d): %w", benchPCR, err)
		}
		return nil
	})
}

// akTemplate is a restricted signing key (an attestation key) for alg.
func akTemplate(alg tpm2.TPMAlgID) tpm2.TPMTPublic {
	attrs := tpm2.TPMAObject{
		FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
		UserWithAuth: true, NoDA: true, Restricted: true, SignEncrypt: true,
	}
	if alg == tpm2.TPMAlgECC {
		return tpm2.TPMTPublic{
			Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
			Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
				Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
				Scheme: tpm2.TPMTECCScheme{
					Scheme:  tpm2.TPMAlgECDSA,
					Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256}),
				},
				CurveID: tpm2.TPMECCNistP256,
				KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
			}),
			Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
				X: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
				Y: tpm2.TPM2BECCParameter{Buffer: make([]byte, 32)},
			}),
		}
	}
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgRSA, NameAlg: tpm2.TPMAlgSHA256, ObjectAttributes: attrs,
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTRSAScheme{
				Scheme:  tpm2.TPMAlgRSASSA,
				Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256}),
			},
			KeyBits: 2048,
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)}),
	}
}

// attestationKey creates (once per target) a primary AK of alg under the
// owner hierarchy and keeps it loaded.
func (t *target) attestationKey(alg tpm2.TPMAlgID) (*tpm2.AuthHandle, error) {
	slot := &t.akRSA
	if alg == tpm2.TPMAlgECC {
		slot = &t.akECC
	}
	if *slot != nil {
		return *slot, nil
	}
	rsp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(akTemplate(alg)),
	}.Execute(t.tpm)
	if err != nil {
		return nil, fmt.Errorf("CreatePrimary AK (alg 0x%x): %w", uint16(alg), err)
	}
	*slot = &tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}
	return *slot, nil
}

var quoteNonce = bytes.Repeat([]byte{0xa5}, 32)

// quote asks for a quote over PCRs 0-7 (sha256) with ak. A fresh TPM may
// answer TPM_RC_RETRY (libtpms precomputes ECC values lazily): retry.
func quote(t transport.TPM, ak *tpm2.AuthHandle) error {
	cmd := tpm2.Quote{
		SignHandle:     *ak,
		QualifyingData: tpm2.TPM2BData{Buffer: quoteNonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
		PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(0, 1, 2, 3, 4, 5, 6, 7),
		}}},
	}
	const attempts = 10
	for i := 1; ; i++ {
		rsp, err := cmd.Execute(t)
		if errors.Is(err, tpm2.TPMRCRetry) && i < attempts {
			continue
		}
		if err != nil {
			return fmt.Errorf("Quote: %w", err)
		}
		if len(rsp.Quoted.Bytes()) == 0 {
			return errors.New("Quote returned no attestation data")
		}
		return nil
	}
}

func benchQuote(b *testing.B, alg tpm2.TPMAlgID, label string) {
	p := sharedPair(b, unixNet, true)
	var aks [2]*tpm2.AuthHandle
	for i, t := range p {
		ak, err := t.attestationKey(alg)
		if err != nil {
			b.Fatalf("%s: %v", t.proc.srv.name, err)
		}
		if err := quote(t.tpm, ak); err != nil { // warm up: absorbs the first TPM_RC_RETRY
			b.Fatalf("%s: first %v", t.proc.srv.name, err)
		}
		aks[i] = ak
	}
	alternate(b, p, label, func(t *target) error {
		ak := aks[sw]
		if t == p[cv] {
			ak = aks[cv]
		}
		return quote(t.tpm, ak)
	})
}

func BenchmarkQuoteECCP256(b *testing.B) { benchQuote(b, tpm2.TPMAlgECC, "Quote ECC P-256") }
func BenchmarkQuoteRSA2048(b *testing.B) { benchQuote(b, tpm2.TPMAlgRSA, "Quote RSA-2048") }

// benchStart starts and stops each server repeatedly (alternating, same
// already-manufactured state dir each time) and reports the median of
// measure, which gets the freshly started process.
func benchStart(b *testing.B, label string, measure func(p *process) (time.Duration, error)) {
	srvs := resolveServers(b)
	samples := min(b.N, maxStartSamples)
	var got [2][]time.Duration
	dirs := [2]string{}
	for i, srv := range srvs {
		dirs[i] = filepath.Join(workDir, "start", srv.name)
		// The first start manufactures the TPM state; it is not timed.
		if _, err := measureOneStart(srv, dirs[i], measure); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for n := 0; n < samples; n++ {
		order := []int{cv, sw}
		if n%2 == 1 {
			order = []int{sw, cv}
		}
		for _, s := range order {
			d, err := measureOneStart(srvs[s], dirs[s], measure)
			if err != nil {
				b.Fatal(err)
			}
			got[s] = append(got[s], d)
		}
	}
	b.StopTimer()
	cvMs, swMs := float64(median(got[cv]).Nanoseconds())/1e6, float64(median(got[sw]).Nanoseconds())/1e6
	report(b, label, cvMs, swMs, plainRatio(cvMs, swMs), "ms")
}

func measureOneStart(srv server, dir string, measure func(p *process) (time.Duration, error)) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	p, err := start(ctx, srv, dir, unixNet, -1)
	if err != nil {
		return 0, err
	}
	d, err := measure(p)
	if stopErr := p.stop(); err == nil && stopErr != nil {
		err = stopErr
	}
	if err != nil {
		return 0, fmt.Errorf("%s: %w", srv.name, err)
	}
	return d, nil
}

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// BenchmarkStartToListening: process start until the unix data socket accepts.
func BenchmarkStartToListening(b *testing.B) {
	benchStart(b, "start to listening (median)", func(p *process) (time.Duration, error) {
		return p.StartDur, nil
	})
}

// BenchmarkStartToFirstResponse: process start until the first GetRandom is
// answered. A server may accept connections before its TPM is ready; this
// measures when it is usable.
func BenchmarkStartToFirstResponse(b *testing.B) {
	benchStart(b, "start to first response (median)", func(p *process) (time.Duration, error) {
		t0 := time.Now()
		c, err := dialTPM(p.network, p.addr)
		if err != nil {
			return 0, err
		}
		defer c.Close()
		if _, err := getRandom(c); err != nil {
			return 0, err
		}
		return p.StartDur + time.Since(t0), nil
	})
}

// BenchmarkIdleRSS starts each server afresh, sends a few commands (GetRandom,
// PCR_Extend, PCR_Read) and reads the resident set of its process tree: all
// of it (VmRSS) and the private anonymous part (RssAnon).
func BenchmarkIdleRSS(b *testing.B) {
	srvs := resolveServers(b)
	var total, anon [2]float64
	for i, srv := range srvs {
		t, err := startTarget(srv, filepath.Join(workDir, "rss", srv.name), unixNet, -1)
		if err != nil {
			b.Fatal(err)
		}
		err = fewCommands(t.tpm)
		var rss, rssAnon int64
		if err == nil {
			rss, err = t.proc.rssBytes("VmRSS")
		}
		if err == nil {
			rssAnon, err = t.proc.rssBytes("RssAnon")
		}
		t.close()
		if err != nil {
			b.Fatalf("%s: %v", srv.name, err)
		}
		total[i] = float64(rss) / (1 << 20)
		anon[i] = float64(rssAnon) / (1 << 20)
	}
	for range b.N {
	}
	b.ReportMetric(anon[cv], "cvtpm-anon-MiB")
	b.ReportMetric(anon[sw], "swtpm-anon-MiB")
	b.ReportMetric(plainRatio(anon[cv], anon[sw]), "anon-ratio")
	results.set("idle RSS anonymous (RssAnon)", anon[cv], anon[sw], plainRatio(anon[cv], anon[sw]), "MiB")
	report(b, "idle RSS (VmRSS, process tree)", total[cv], total[sw], plainRatio(total[cv], total[sw]), "MiB")
}

func fewCommands(t transport.TPM) error {
	for range 5 {
		if _, err := getRandom(t); err != nil {
			return err
		}
	}
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(benchPCR), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}},
	}.Execute(t)
	if err != nil {
		return fmt.Errorf("PCR_Extend: %w", err)
	}
	_, err = tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(0, benchPCR),
	}}}}.Execute(t)
	if err != nil {
		return fmt.Errorf("PCR_Read: %w", err)
	}
	return nil
}

// resultTable collects the last figures of each benchmark for the summary
// printed after the run.
type resultTable struct {
	mu   sync.Mutex
	rows map[string]resultRow
	seq  int
}

type resultRow struct {
	order int
	cvVal float64
	swVal float64
	ratio float64
	unit  string
}

func (r *resultTable) set(label string, cvVal, swVal, ratio float64, unit string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.rows == nil {
		r.rows = map[string]resultRow{}
	}
	order := r.seq
	if old, ok := r.rows[label]; ok {
		order = old.order
	} else {
		r.seq++
	}
	r.rows[label] = resultRow{order: order, cvVal: cvVal, swVal: swVal, ratio: ratio, unit: unit}
}

func (r *resultTable) print(w io.Writer) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.rows) == 0 {
		return
	}
	labels := make([]string, 0, len(r.rows))
	for l := range r.rows {
		labels = append(labels, l)
	}
	sort.Slice(labels, func(i, j int) bool { return r.rows[labels[i]].order < r.rows[labels[j]].order })
	fmt.Fprintf(w, "\ncvtpm vs swtpm, same run, alternating blocks; latencies are medians over blocks,\n")
	fmt.Fprintf(w, "ratio = cvtpm/swtpm (median of per-block ratios for latencies); below 1 means cvtpm is faster or smaller\n")
	if m, err := benchPinMode(); err == nil {
		fmt.Fprintf(w, "latency benchmarks pinned: CVTPM_BENCH_PIN=%s (same: client and servers share one CPU; cross: different CPUs)\n", m)
	}
	fmt.Fprintf(w, "%-48s %14s %14s %7s  %s\n", "measurement", "cvtpm", "swtpm", "ratio", "goal (issue 13)")
	for _, l := range labels {
		row := r.rows[l]
		fmt.Fprintf(w, "%-48s %10.2f %-3s %10.2f %-3s %7.2f  %s\n", l, row.cvVal, unitShort(row.unit), row.swVal, unitShort(row.unit), row.ratio, goalOf(l, row.ratio))
	}
}

// goals are issue 13's targets for the cvtpm/swtpm ratio: small commands
// at most 1.05 (idle and under load), swtpm's own ground (a connection per
// command, start, idle memory) at or below swtpm.
var goals = map[string]float64{
	"GetRandom(8) raw bytes, unix":                    1.05,
	"GetRandom(8) go-tpm, unix":                       1.05,
	"GetRandom(8) go-tpm, tcp":                        1.05,
	"GetRandom(8) raw bytes, unix, 2 busy processes":  1.05,
	"GetRandom(8) raw, bursts of 20 after 20 ms idle": 1.05,
	"PCR_Extend sha256":                               1.05,
	"GetRandom(8) conn/command, unix":                 1.00,
	"start to listening (median)":                     1.00,
	"start to first response (median)":                1.00,
	"idle RSS anonymous (RssAnon)":                    1.00,
	"idle RSS (VmRSS, process tree)":                  1.00,
}

// goalOf says the goal for a row and whether ratio meets it.
func goalOf(label string, ratio float64) string {
	g, ok := goals[label]
	if !ok {
		return "-"
	}
	if ratio <= g {
		return fmt.Sprintf("<= %.2f met", g)
	}
	return fmt.Sprintf("<= %.2f NOT MET", g)
}

func unitShort(unit string) string {
	if unit == "us/op" {
		return "us"
	}
	return unit
}

// BenchmarkGetRandomUnderLoad is BenchmarkGetRandomRaw while two busy
// processes compete for the CPUs (started here, one pinned to each CPU,
// stopped after): the ratio against swtpm must hold when the host is not
// idle, not only at rest. Its blocks are timed (loadBlock each, at least
// b.N commands per server in all) rather than counted: a block of 50
// commands lasts about a millisecond, less than one scheduler slice, so
// each block fell wholly in or out of the busy process's turn and the
// ratio swung 0.72-1.29 from run to run (2026-12-02).
func BenchmarkGetRandomUnderLoad(b *testing.B) {
	p := sharedPair(b, unixNet, true)
	for cpu := range runtime.NumCPU() {
		busy := exec.Command("sh", "-c", "while :; do :; done")
		if err := startOnCPU(busy, cpu); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { busy.Process.Kill(); busy.Wait() })
	}
	alternateTimed(b, p, "GetRandom(8) raw bytes, unix, 2 busy processes", loadBlock, func(t *target) error { return sendRawGetRandom(t.tpm) })
}

// BenchmarkGetRandomBursts sends raw GetRandom(8) in bursts of
// burstLen commands, each after burstGap of silence, the servers taking
// turns burst by burst: how a guest uses its TPM (a few commands at boot,
// at an attestation, at an unseal), rather than one endless stream. A
// server's first command after the silence, and the commands right after
// it, are what the streaming benchmarks above do not see. Besides the
// latency it reports each server's CPU time per command (the sum of its
// threads' schedstat), which on a shared CPU is what a command takes from
// everything else.
func BenchmarkGetRandomBursts(b *testing.B) {
	p := sharedPair(b, unixNet, true)
	defer pinClient(b)()
	bursts := max(blocks, b.N/burstLen)
	var perOp [2][]float64
	var ratios []float64
	var cpuStart, cpuEnd [2]time.Duration
	for s := range p {
		cpuStart[s] = testenv.CPUTime(p[s].proc.Cmd.Process.Pid)
	}
	b.ResetTimer()
	for i := range bursts {
		order := [2]int{cv, sw}
		if i%2 == 1 {
			order = [2]int{sw, cv}
		}
		var us [2]float64
		for _, s := range order {
			time.Sleep(burstGap)
			t0 := time.Now()
			for range burstLen {
				if err := sendRawGetRandom(p[s].tpm); err != nil {
					b.Fatalf("burst on %s: %v", p[s].proc.srv.name, err)
				}
			}
			us[s] = float64(time.Since(t0).Nanoseconds()) / 1e3 / burstLen
			perOp[s] = append(perOp[s], us[s])
		}
		ratios = append(ratios, us[cv]/us[sw])
	}
	b.StopTimer()
	for s := range p {
		cpuEnd[s] = testenv.CPUTime(p[s].proc.Cmd.Process.Pid)
	}
	report(b, "GetRandom(8) raw, bursts of 20 after 20 ms idle", medianFloat(perOp[cv]), medianFloat(perOp[sw]), medianFloat(ratios), "us/op")
	var cpuPerOp [2]float64
	for s := range p {
		cpuPerOp[s] = float64((cpuEnd[s] - cpuStart[s]).Nanoseconds()) / 1e3 / float64(bursts*burstLen)
	}
	b.ReportMetric(cpuPerOp[cv], "cvtpm-cpu-us/op")
	b.ReportMetric(cpuPerOp[sw], "swtpm-cpu-us/op")
	results.set("server CPU per command, those bursts", cpuPerOp[cv], cpuPerOp[sw], plainRatio(cpuPerOp[cv], cpuPerOp[sw]), "us/op")
}

// A burst: BenchmarkGetRandomBursts.
const (
	burstLen = 20
	burstGap = 20 * time.Millisecond
)

// loadBlock is one timed block of BenchmarkGetRandomUnderLoad: several
// scheduler slices (CFS gives a busy process 3 ms and more at a time).
const loadBlock = 25 * time.Millisecond
