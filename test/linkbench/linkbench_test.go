package linkbench

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	backendpb "cvtpm/api/backend"
	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/gcm"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/sockmap"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
)

// path is one way to reach a TPM.
type path struct {
	name string
	tpm  transport.TPMCloser
	// pids are the processes that serve the path (with everything under
	// them), for its CPU time; set for the first three paths.
	pids []int
}

func dialTCP(b *testing.B, tcti string) transport.TPMCloser {
	// tcti is "swtpm:host=127.0.0.1,port=P"
	port := tcti[strings.LastIndex(tcti, "=")+1:]
	c, err := tpmsock.Dial(context.Background(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c
}

// paths starts swtpm, cvtpm and the attested topology, each over TCP.
// With hops it adds two shorter attested paths that take one process off
// the full one at a time, so the differences price each hop: the guest
// proxy straight to the backend (no relay), and the link client in this
// process straight to the backend (no guest proxy either).
func paths(b *testing.B, hops bool) []path {
	b.Helper()
	var out []path
	for _, impl := range testenv.Both {
		srv := testenv.StartSocket(b, impl, testenv.Options{TCP: true})
		out = append(out, path{name: string(impl) + " socket", tpm: dialTCP(b, srv.TCTI()), pids: []int{srv.Cmd.Process.Pid}})
	}
	f := testenv.NewTopologyFiles(b, 0x7)
	topo := testenv.StartBackend(b, f)
	topo.Admin(b, "create", "vm1")
	relayd, relay := topo.StartRelayDaemon(b)
	proxy, tcti := topo.StartGuestProxy(b, relay, "guest-vm1", "vm1", f.Policy)
	t := dialTCP(b, tcti)
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(t); err != nil {
		b.Fatal(err)
	}
	out = append(out, path{name: "attested (proxy->relay->backend)", tpm: t,
		pids: []int{proxy.Cmd.Process.Pid, relayd.Cmd.Process.Pid, topo.Backend.Cmd.Process.Pid}})
	if !hops {
		return out
	}
	_, tcti = topo.StartGuestProxy(b, topo.LinkAddr, "guest-vm1", "vm1", f.Policy)
	out = append(out, path{name: "proxy->backend", tpm: dialTCP(b, tcti)})
	out = append(out, path{name: "link client->backend", tpm: linkClient(b, topo, "guest-vm1", "vm1", true)})
	// The same two ends with every command through the backend's
	// supervisor (no direct session), as before direct sessions.
	_, tcti = topo.StartGuestProxy(b, relay, "guest-vm1", "vm1", f.Policy, "--direct", "off")
	out = append(out, path{name: "attested, via the supervisor", tpm: dialTCP(b, tcti)})
	out = append(out, path{name: "link client->backend, via the supervisor", tpm: linkClient(b, topo, "guest-vm1", "vm1", false)})
	// A Go agent in the guest with the link in its own process
	// (guestkit.Proxy.TPM), no guest proxy: through the copying relay.
	out = append(out, path{name: "link client->relay->backend", tpm: linkClientVia(b, topo, relay, "guest-vm1", "vm1", true)})
	// The relay joined in the kernel (--relay-join on, root only).
	if sockmapAvailable() {
		joined := topo.StartPlainRelay(b, "--relay-join", "on")
		_, tcti = topo.StartGuestProxy(b, joined, "guest-vm1", "vm1", f.Policy)
		out = append(out, path{name: "attested, relay joined in the kernel", tpm: dialTCP(b, tcti)})
		out = append(out, path{name: "link client->joined relay->backend", tpm: linkClientVia(b, topo, joined, "guest-vm1", "vm1", true)})
	}
	return out
}

// sockmapAvailable says whether this process may join connections in the
// kernel (as the relay would).
func sockmapAvailable() bool {
	j, err := sockmap.New()
	if err != nil {
		return false
	}
	j.Close()
	return true
}

// linkClient is the attested link's client in this process, a go-tpm
// transport to one instance of the backend; with direct, its commands go
// through a direct session with the instance's worker.
func linkClient(b *testing.B, topo *testenv.Topology, identity, instance string, direct bool) transport.TPMCloser {
	b.Helper()
	return linkClientVia(b, topo, topo.LinkAddr, identity, instance, direct)
}

// linkClientVia is linkClient dialling link (a relay, or the backend).
func linkClientVia(b *testing.B, topo *testenv.Topology, link, identity, instance string, direct bool) transport.TPMCloser {
	b.Helper()
	c := topo.Files.Certs[identity]
	cert, err := tls.LoadX509KeyPair(c[0], c[1])
	if err != nil {
		b.Fatal(err)
	}
	policy, err := csv.LoadAppraisalPolicy(topo.Files.Policy)
	if err != nil {
		b.Fatal(err)
	}
	dial := func(ctx context.Context) (*attestedlink.Session, error) {
		conn, err := netaddr.Dial(ctx, link)
		if err != nil {
			return nil, err
		}
		return attestedlink.Dial(ctx, conn, attestedlink.ClientConfig{Certificate: cert, Policy: policy})
	}
	if direct {
		tpm, caller := attestedlink.RemoteTPMDirect(instance, gcm.AES256, dial, nil)
		b.Cleanup(func() { caller.Close() })
		return rpcTPM{tpm, caller}
	}
	tpm, caller := attestedlink.RemoteTPM(instance, dial, nil)
	if _, err := caller.Connect(context.Background()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { caller.Close() })
	return rpcTPM{tpm, caller}
}

// rpcTPM adapts a tpmrpc client to go-tpm's transport.
type rpcTPM struct {
	c      *tpmrpc.Client
	closer io.Closer
}

func (t rpcTPM) Send(cmd []byte) ([]byte, error) {
	resp := t.c.Execute(nil, cmd)
	if err := t.c.Err(); err != nil {
		return nil, err
	}
	return resp, nil
}

func (t rpcTPM) Close() error { return t.closer.Close() }

// alternate runs op on every path in turn, in blocks, so drift of the
// machine's speed hits all alike; it reports the median per-op time.
func alternate(b *testing.B, ps []path, op func(transport.TPM) error) []time.Duration {
	const blocks = 10
	per := max(b.N/blocks, 1)
	samples := make([][]time.Duration, len(ps))
	for range blocks {
		for i, p := range ps {
			start := time.Now()
			for range per {
				if err := op(p.tpm); err != nil {
					b.Fatalf("%s: %v", p.name, err)
				}
			}
			samples[i] = append(samples[i], time.Since(start)/time.Duration(per))
		}
	}
	med := make([]time.Duration, len(ps))
	for i, s := range samples {
		sort.Slice(s, func(a, c int) bool { return s[a] < s[c] })
		med[i] = s[len(s)/2]
	}
	return med
}

// warmUp says whether this is the testing package's one-iteration probe
// before the run -benchtime asked for (make bench asks for 2000): its
// medians are one command each, noise, and are not printed.
func warmUp(b *testing.B) bool { return b.N == 1 }

func report(b *testing.B, label string, ps []path, med []time.Duration, goal string) {
	sw, cv, at := med[0], med[1], med[2]
	b.ReportMetric(float64(sw.Nanoseconds())/1e3, "swtpm-us")
	b.ReportMetric(float64(cv.Nanoseconds())/1e3, "cvtpm-us")
	b.ReportMetric(float64(at.Nanoseconds())/1e3, "attested-us")
	b.ReportMetric(float64((at-cv).Nanoseconds())/1e3, "added-us")
	if warmUp(b) {
		return
	}
	fmt.Printf("%-28s swtpm %8.1f us | cvtpm socket %8.1f us | attested path %8.1f us | added by the attested path %+8.1f us (%.2fx swtpm)%s; %s\n",
		label, us(sw), us(cv), us(at), us(at-cv), float64(at)/float64(sw), goal, placement())
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// Issue 13's goals: what the attested path may add to a small command, the
// proportional memory of an idle instance, and the time to create one
// (half of the 22 ms measured when the issue was filed).
const (
	attestedGoalUs      = 40
	idleInstanceGoalMiB = 1.5
	createGoalMs        = 11
)

// meets says "; goal <= g unit: met" or "... NOT MET".
func meets(v, g float64, unit string) string {
	verdict := "met"
	if v > g {
		verdict = "NOT MET"
	}
	return fmt.Sprintf("; goal <= %g %s: %s", g, unit, verdict)
}

func BenchmarkAttestedGetRandom(b *testing.B) {
	ps := paths(b, true)
	b.ResetTimer()
	med := alternate(b, ps, func(t transport.TPM) error {
		_, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(t)
		return err
	})
	report(b, "GetRandom(8)", ps, med, meets(us(med[2]-med[1]), attestedGoalUs, "us added"))
	full, noRelay, inProcess, socket := med[2], med[3], med[4], med[1]
	viaSup, viaSupInProcess := med[5], med[6]
	b.ReportMetric(us(viaSup-socket), "added-via-supervisor-us")
	if warmUp(b) {
		return
	}
	fmt.Printf("  the attested path's hops, same run (differences of medians); commands go through a direct session with the instance's worker:\n"+
		"    relay (host, a byte pump)                     %+8.1f us  (proxy->relay->backend %.1f - proxy->backend %.1f)\n"+
		"    guest proxy process (swtpm protocol, link)    %+8.1f us  (proxy->backend - link client->backend %.1f)\n"+
		"    backend: direct-session records, worker       %+8.1f us  (link client->backend - cvtpm socket %.1f)\n"+
		"  the same path with every command through the backend's supervisor (guest proxy --direct off):\n"+
		"    attested, via the supervisor                  %8.1f us  (added %+.1f us)\n"+
		"    the supervisor hop (TLS, supervisor->worker)  %+8.1f us  (link client via the supervisor %.1f - link client direct); see BenchmarkCall and BenchmarkSupervisorGetRandom below\n",
		us(full-noRelay), us(full), us(noRelay), us(noRelay-inProcess), us(inProcess), us(inProcess-socket), us(socket),
		us(viaSup), us(viaSup-socket), us(viaSupInProcess-inProcess), us(viaSupInProcess))
	cpuByProcess(b, ps[2])
	agent := med[7]
	b.ReportMetric(us(agent-socket), "added-agent-us")
	fmt.Printf("  a Go agent with the link in its own process (guestkit.Proxy.TPM; no guest proxy process):\n"+
		"    through the relay                             %8.1f us  (added %+.1f us%s)\n",
		us(agent), us(agent-socket), meets(us(agent-socket), attestedGoalUs, "us added"))
	if len(med) > 8 {
		joined, agentJoined := med[8], med[9]
		b.ReportMetric(us(agentJoined-socket), "added-agent-relay-joined-us")
		b.ReportMetric(us(joined-socket), "added-relay-joined-us")
		fmt.Printf("  with the relay joined in the kernel (cvtpm frontend --relay-join on; gives up TCP backpressure, see internal/sockmap):\n"+
			"    attested path                                 %8.1f us  (added %+.1f us%s)\n"+
			"    relay                                         %+8.1f us  (joined - proxy->backend)\n",
			us(joined), us(joined-socket), meets(us(joined-socket), attestedGoalUs, "us added"), us(joined-noRelay))
		fmt.Printf("    a Go agent through the joined relay           %8.1f us  (added %+.1f us%s)\n",
			us(agentJoined), us(agentJoined-socket), meets(us(agentJoined-socket), attestedGoalUs, "us added"))
	} else {
		fmt.Println("  the relay joined in the kernel: not measured (needs root and sockmap)")
	}
}

// BenchmarkAttestedBursts sends GetRandom(8) in bursts of burstLen
// commands, each after burstGap of silence, on swtpm, a cvtpm socket and
// the attested path in turn: how a guest uses its TPM, where every
// benchmark above keeps each path busy without a pause. It reports each
// path's latency and the CPU time its processes use per command (the
// attested path's: guest proxy, relay, backend and workers), which after
// each pause includes every Go process's sysmon waking up (see
// test/bench's BenchmarkGetRandomBursts).
func BenchmarkAttestedBursts(b *testing.B) {
	const (
		burstLen = 20
		burstGap = 20 * time.Millisecond
	)
	ps := paths(b, false)
	bursts := max(20, b.N/burstLen)
	cpu0 := make([]time.Duration, len(ps))
	for i, p := range ps {
		cpu0[i] = testenv.CPUTime(p.pids...)
	}
	lat := make([][]time.Duration, len(ps))
	b.ResetTimer()
	for range bursts {
		for i, p := range ps {
			time.Sleep(burstGap)
			start := time.Now()
			for range burstLen {
				if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(p.tpm); err != nil {
					b.Fatalf("%s: %v", p.name, err)
				}
			}
			lat[i] = append(lat[i], time.Since(start)/burstLen)
		}
	}
	b.StopTimer()
	if warmUp(b) {
		return
	}
	fmt.Printf("GetRandom(8) in bursts of %d after %v of silence (median per command; CPU of the path's processes per command); %s:\n", burstLen, burstGap, placement())
	for i, p := range ps {
		s := lat[i]
		sort.Slice(s, func(a, c int) bool { return s[a] < s[c] })
		cpu := (testenv.CPUTime(p.pids...) - cpu0[i]) / time.Duration(bursts*burstLen)
		fmt.Printf("    %-36s %8.1f us  CPU %8.1f us\n", p.name, us(s[len(s)/2]), us(cpu))
		b.ReportMetric(us(cpu), fmt.Sprintf("cpu-us/op-%d", i))
	}
}

func BenchmarkAttestedQuoteECC(b *testing.B) {
	ps := paths(b, false)
	keys := make([]*tpm2.AuthHandle, len(ps))
	for i, p := range ps {
		k, err := signingKey(p.tpm)
		if err != nil {
			b.Fatalf("%s: %v", p.name, err)
		}
		keys[i] = k
	}
	idx := map[transport.TPM]int{}
	for i, p := range ps {
		idx[p.tpm] = i
	}
	b.ResetTimer()
	med := alternate(b, ps, func(t transport.TPM) error {
		_, err := (tpm2.Quote{SignHandle: *keys[idx[t]], QualifyingData: tpm2.TPM2BData{Buffer: []byte("nonce")},
			InScheme: tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
				{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(0, 1, 2, 3, 4, 5, 6, 7)}}}}).Execute(t)
		if err != nil && strings.Contains(err.Error(), "RETRY") {
			return nil // a fresh TPM may ask once for a retry (DESIGN.md)
		}
		return err
	})
	report(b, "Quote ECC P-256 (PCR 0-7)", ps, med, "")
}

// signingKey creates a primary ECC P-256 restricted signing key (an AK).
func signingKey(t transport.TPM) (*tpm2.AuthHandle, error) {
	tmpl := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true,
			UserWithAuth: true, Restricted: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256}),
	}
	rsp, err := (tpm2.CreatePrimary{PrimaryHandle: tpm2.TPMRHEndorsement, InPublic: tpm2.New2B(tmpl)}).Execute(t)
	if err != nil {
		return nil, err
	}
	return &tpm2.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name, Auth: tpm2.PasswordAuth(nil)}, nil
}

// BenchmarkIdleInstances creates many instances in one backend and
// reports the resident memory per idle instance (worker processes plus the
// backend's share). CVTPM_BENCH_INSTANCES overrides the count (500).
func BenchmarkIdleInstances(b *testing.B) {
	n := 500
	if s := os.Getenv("CVTPM_BENCH_INSTANCES"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	f := testenv.NewTopologyFiles(b, 0x7)
	topo := testenv.StartBackend(b, f)
	abs, _ := filepath.Abs(topo.AdminSock)
	conn, err := grpc.NewClient("unix://"+abs, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	c := backendpb.NewInstanceManagerClient(conn)
	start := time.Now()
	for i := range n {
		if _, err := c.CreateInstance(context.Background(), &backendpb.CreateInstanceRequest{Id: fmt.Sprintf("vm%04d", i)}); err != nil {
			b.Fatalf("instance %d: %v", i, err)
		}
		if (i+1)%100 == 0 {
			fmt.Fprintf(os.Stderr, "  created %d/%d instances (%.1fs)\n", i+1, n, time.Since(start).Seconds())
		}
	}
	created := time.Since(start)
	time.Sleep(2 * time.Second) // let the workers settle
	// What idle instances cost in CPU: every wake-up of a worker's or the
	// backend's threads (timers, the Go runtime's sysmon) counts here.
	const idleFor = 5 * time.Second
	cpu0 := testenv.CPUTime(topo.Backend.Cmd.Process.Pid)
	time.Sleep(idleFor)
	idleCPU := testenv.CPUTime(topo.Backend.Cmd.Process.Pid) - cpu0
	idleUsPerSec := float64(idleCPU.Microseconds()) / idleFor.Seconds() / float64(n)
	b.ReportMetric(idleUsPerSec, "idle-cpu-us/s/instance")
	resp, err := c.ListInstances(context.Background(), &backendpb.ListInstancesRequest{})
	if err != nil || len(resp.Instances) != n {
		b.Fatalf("list: %d instances, %v", len(resp.Instances), err)
	}
	var rss, pss, anon int64
	// The backend and every process it started: the instances' workers
	// and the spare one started ahead of need.
	backend := topo.Backend.Cmd.Process.Pid
	pids := append([]int{backend}, testenv.ChildrenOf(backend)...)
	if len(pids) < n+1 {
		b.Fatalf("%d processes under the backend for %d instances", len(pids), n)
	}
	for _, pid := range pids {
		m, err := memOf(pid)
		if err != nil {
			b.Fatal(err)
		}
		rss, pss, anon = rss+m["Rss"], pss+m["Pss"], anon+m["Anonymous"]
	}
	for range b.N {
	}
	mib := func(v int64) float64 { return float64(v) / float64(n) / (1 << 20) }
	b.ReportMetric(mib(pss), "PSS-MiB/instance")
	b.ReportMetric(mib(anon), "anon-MiB/instance")
	b.ReportMetric(mib(rss), "RSS-MiB/instance")
	b.ReportMetric(created.Seconds()/float64(n)*1e3, "ms-to-create")
	perCreate := created.Seconds() / float64(n) * 1e3
	fmt.Printf("%d idle instances in one backend: %.2f MiB per instance proportional (PSS of the backend, its workers and its spare worker, per instance%s; %.2f MiB anonymous; RSS %.1f MiB counts the shared binary once per worker); created in %.1f s (%.1f ms each%s); %d CPUs\n",
		n, mib(pss), meets(mib(pss), idleInstanceGoalMiB, "MiB"), mib(anon), mib(rss), created.Seconds(), perCreate, meets(perCreate, createGoalMs, "ms"), runtime.NumCPU())
	fmt.Printf("the same instances idle for %v: %.1f us of CPU per second per instance (the backend and every process under it: %v in all, after %v for starting them)\n",
		idleFor, idleUsPerSec, idleCPU.Round(time.Microsecond), cpu0.Round(time.Millisecond))
	if n > 0 {
		if bd, err := memoryBreakdown(int(resp.Instances[0].Pid)); err == nil {
			fmt.Printf("one idle worker (pid %d), by owner:\n%s", resp.Instances[0].Pid, bd)
		}
	}
	worn(b, topo, resp.Instances)
	// Back to back, each creation above also paid for starting the next
	// spare worker on the same CPUs. One creation on a backend that is not
	// already creating, the usual case:
	var single []time.Duration
	for i := range 10 {
		time.Sleep(300 * time.Millisecond)
		t0 := time.Now()
		if _, err := c.CreateInstance(context.Background(), &backendpb.CreateInstanceRequest{Id: fmt.Sprintf("single%02d", i)}); err != nil {
			b.Fatalf("single creation %d: %v", i, err)
		}
		single = append(single, time.Since(t0))
	}
	sort.Slice(single, func(i, j int) bool { return single[i] < single[j] })
	one := float64(single[len(single)/2].Microseconds()) / 1e3
	b.ReportMetric(one, "ms-to-create-one")
	fmt.Printf("one creation on an otherwise idle backend (median of 10, the admin API's round trip included): %.1f ms%s\n", one, meets(one, createGoalMs, "ms"))
}

// worn measures idle instances that have worked first, as a guest's boot
// and use make them: a fresh worker has touched only what its start
// needed, and every heap page a worker touches later stays its own until
// a collection, which an idle worker's small heap rarely reaches. Some of
// the instances each run TPM2_Startup, wornCommands PCR_Extends and
// wornNVWrites NV_DefineSpaces (each a sealed write of the TPM's
// permanent state); their workers' PSS is then set beside the fresh ones'.
func worn(b *testing.B, topo *testenv.Topology, insts []*backendpb.Instance) {
	const (
		instances    = 10
		wornCommands = 1000
		wornNVWrites = 20
	)
	if len(insts) < 2*instances {
		return
	}
	extend := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}}}
	for _, inst := range insts[:instances] {
		t := linkClient(b, topo, "frontend", inst.Id, false)
		if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(t); err != nil {
			b.Fatalf("%s: %v", inst.Id, err)
		}
		for i := range wornCommands {
			if _, err := extend.Execute(t); err != nil {
				b.Fatalf("%s: %v", inst.Id, err)
			}
			if i%(wornCommands/wornNVWrites) == 0 {
				pub := tpm2.TPMSNVPublic{NVIndex: tpm2.TPMHandle(0x01500000 + i), NameAlg: tpm2.TPMAlgSHA256,
					Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTOrdinary}, DataSize: 64}
				if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(t); err != nil {
					b.Fatalf("%s: %v", inst.Id, err)
				}
			}
		}
		t.Close()
	}
	time.Sleep(2 * time.Second)
	pss := func(set []*backendpb.Instance) float64 {
		var sum int64
		for _, inst := range set {
			m, err := memOf(int(inst.Pid))
			if err != nil {
				b.Fatal(err)
			}
			sum += m["Pss"]
		}
		return float64(sum) / float64(len(set)) / (1 << 20)
	}
	wornPSS, freshPSS := pss(insts[:instances]), pss(insts[instances:2*instances])
	b.ReportMetric(wornPSS, "worn-worker-PSS-MiB")
	fmt.Printf("a worker after TPM2_Startup, %d PCR_Extends and %d NV_DefineSpaces (sealed writes), idle: %.2f MiB PSS, against %.2f MiB for a fresh one (%+.0f KiB; mean of %d each)\n",
		wornCommands, wornNVWrites, wornPSS, freshPSS, (wornPSS-freshPSS)*1024, instances)
	if bd, err := memoryBreakdown(int(insts[0].Pid)); err == nil {
		fmt.Printf("one such worker (pid %d), by owner:\n%s", insts[0].Pid, bd)
	}
}

// memoryBreakdown sorts one idle worker's mappings (/proc/PID/smaps) into
// what holds them, in KiB: anonymous pages by owner, file pages by PSS.
func memoryBreakdown(pid int) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	kib := map[string]int64{}
	var owner, prevName string
	var pss, anon int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			start, _ := strconv.ParseUint(strings.SplitN(fields[0], "-", 2)[0], 16, 64)
			name := ""
			if len(fields) >= 6 {
				name = fields[5]
			}
			switch {
			case name == "[heap]" || (name == "" && start >= 0x700000000000 && start%(64<<20) == 0):
				// the main arena, or a 64 MiB-aligned glibc thread arena
				owner = "C heap (malloc: libtpms, OpenSSL)"
			case name == exe || (name == "" && prevName == exe):
				owner = "binary data and bss (libtpms, OpenSSL, Go globals)"
			case name != "":
				owner = "shared libraries (libc, loader), private pages"
			case start < 0x700000000000:
				owner = "Go heap"
			default:
				owner = "Go runtime metadata and thread stacks"
			}
			prevName = name
			continue
		}
		if len(fields) >= 2 && (fields[0] == "Anonymous:" || fields[0] == "Pss:") {
			v, _ := strconv.ParseInt(fields[1], 10, 64)
			if fields[0] == "Pss:" {
				pss += v
			} else {
				kib[owner] += v
				anon += v
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	kib["file pages, this worker's proportional share (binary code, libc)"] = pss - anon
	keys := make([]string, 0, len(kib))
	for k := range kib {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return kib[keys[i]] > kib[keys[j]] })
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "  %5d KiB  %s\n", kib[k], k)
	}
	return b.String(), nil
}

// memOf reads a process's /proc/PID/smaps_rollup (values in bytes).
func memOf(pid int) (map[string]int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		fields := strings.Fields(v)
		if !ok || len(fields) == 0 {
			continue
		}
		kb, _ := strconv.ParseInt(fields[0], 10, 64)
		out[k] = kb << 10
	}
	return out, sc.Err()
}

// hostPath is QEMU's side of a frontend serving one VM: the control
// socket, and a data channel handed over with CMD_SET_DATAFD, as QEMU's
// tpm-emulator backend does.
func hostPath(b *testing.B, ctrl string) transport.TPMCloser {
	b.Helper()
	c, err := net.Dial("unix", ctrl)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(pair[1])
	const cmdSetDataFD = 0x10
	if _, _, err := c.(*net.UnixConn).WriteMsgUnix(binary.BigEndian.AppendUint32(nil, cmdSetDataFD), unix.UnixRights(pair[1]), nil); err != nil {
		b.Fatal(err)
	}
	var res [4]byte
	if _, err := io.ReadFull(c, res[:]); err != nil || binary.BigEndian.Uint32(res[:]) != 0 {
		b.Fatalf("CMD_SET_DATAFD: % x, %v", res, err)
	}
	f := os.NewFile(uintptr(pair[0]), "tpm-data")
	data, err := net.FileConn(f)
	f.Close()
	if err != nil {
		b.Fatal(err)
	}
	t := tpmsock.New(data)
	b.Cleanup(func() { t.Close() })
	return t
}

// BenchmarkHostPathGetRandom prices QEMU's path (QEMU -> frontend ->
// backend -> worker) with and without direct sessions, beside a cvtpm
// and a swtpm socket.
func BenchmarkHostPathGetRandom(b *testing.B) {
	var ps []path
	for _, impl := range testenv.Both {
		srv := testenv.StartSocket(b, impl, testenv.Options{TCP: true})
		ps = append(ps, path{name: string(impl) + " socket", tpm: dialTCP(b, srv.TCTI())})
	}
	f := testenv.NewTopologyFiles(b, 0x7)
	topo := testenv.StartBackend(b, f)
	topo.Admin(b, "create", "vm1")
	fc := f.Certs["frontend"]
	for _, mode := range []string{"aes-256-gcm", "off"} {
		ctrl := filepath.Join(f.Dir, "vm1-"+mode+".ctrl")
		testenv.StartDaemon(b, "frontend", []string{"unix:" + ctrl}, "frontend", "--backend", topo.LinkAddr,
			"--tls-cert", fc[0], "--tls-key", fc[1], "--policy", f.Policy, "--cert-dir", f.CertDir, "--vm", "vm1="+ctrl, "--direct", mode)
		ps = append(ps, path{name: "QEMU's path, --direct " + mode, tpm: hostPath(b, ctrl)})
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(ps[2].tpm); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	med := alternate(b, ps, func(t transport.TPM) error {
		_, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(t)
		return err
	})
	sw, socket, direct, viaSup := med[0], med[1], med[2], med[3]
	b.ReportMetric(us(direct-socket), "added-direct-us")
	b.ReportMetric(us(viaSup-socket), "added-via-supervisor-us")
	if warmUp(b) {
		return
	}
	fmt.Printf("GetRandom(8), QEMU's path (frontend -> backend): swtpm %.1f us | cvtpm socket %.1f us | direct session %.1f us (added %+.1f) | through the supervisor %.1f us (added %+.1f)\n",
		us(sw), us(socket), us(direct), us(direct-socket), us(viaSup), us(viaSup-socket))
}

// cpuByProcess runs GetRandom(8) on the attested path alone and prints the
// CPU time each process on it uses per command (its threads' schedstat):
// on one CPU the path's latency is about the sum of these, so they say
// where its time goes without the noise of differences between paths.
// p.pids is the guest proxy, the relay and the backend (whose children
// are the workers).
func cpuByProcess(b *testing.B, p path) {
	const n = 2000
	proxy, relay, backend := p.pids[0], p.pids[1], p.pids[2]
	workersRuns := func() (r int64) {
		for _, w := range testenv.ChildrenOf(backend) {
			r += testenv.ThreadsRuns(w)
		}
		return r
	}
	sample := func() (cpu [5]time.Duration, runs [5]int64) {
		return [5]time.Duration{
				testenv.ThreadsCPU(os.Getpid()), testenv.CPUTime(proxy), testenv.CPUTime(relay),
				testenv.ThreadsCPU(backend), testenv.CPUTime(testenv.ChildrenOf(backend)...),
			}, [5]int64{
				testenv.ThreadsRuns(os.Getpid()), testenv.ThreadsRuns(proxy), testenv.ThreadsRuns(relay),
				testenv.ThreadsRuns(backend), workersRuns(),
			}
	}
	before, runsBefore := sample()
	start := time.Now()
	for range n {
		if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(p.tpm); err != nil {
			b.Fatalf("%s: %v", p.name, err)
		}
	}
	wall := time.Since(start) / n
	after, runsAfter := sample()
	names := [5]string{"the client (this process: go-tpm, TCP)", "guest proxy", "relay", "backend's supervisor", "workers"}
	fmt.Printf("  CPU per command by process on the attested path (%d GetRandoms, %.1f us each), and how often its threads were put on a CPU:\n", n, us(wall))
	var sum time.Duration
	var runs float64
	for i := range names {
		d := (after[i] - before[i]) / n
		r := float64(runsAfter[i]-runsBefore[i]) / n
		sum += d
		runs += r
		fmt.Printf("    %-40s %8.1f us %6.2f runs\n", names[i], us(d), r)
	}
	fmt.Printf("    %-40s %8.1f us %6.2f runs\n", "all", us(sum), runs)
}
