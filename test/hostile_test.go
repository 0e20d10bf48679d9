package test

// Issue 15: every daemon survives a hostile client. Each case runs against
// the real processes and checks that the process stays up and serves a
// good request right after, that its memory stays within a stated bound,
// and that state written before the storm is intact. The figures are
// logged (go test -v) and written in the README's reliability section.

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	attestpb "cvtpm/api/attest"
	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/enroll"
	"cvtpm/internal/attestedlink"
	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
)

// rssKiB is a process's resident set (VmRSS) in KiB.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	v, err := testenv.ProcStatus(pid, "VmRSS")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(strings.TrimSuffix(v, " kB"))
	if err != nil {
		t.Fatalf("VmRSS of pid %d: %q", pid, v)
	}
	return n
}

// flood opens n connections to addr ("tcp:H:P" or "unix:PATH") and holds
// them; it returns how many the kernel accepted and a function closing
// them.
func flood(network, addr string, n int) (int, func()) {
	var conns []net.Conn
	for range n {
		c, err := net.DialTimeout(network, addr, time.Second)
		if err != nil {
			continue
		}
		conns = append(conns, c)
	}
	return len(conns), func() {
		for _, c := range conns {
			c.Close()
		}
	}
}

// eventually retries f for up to 10 s (caps and backoffs release
// asynchronously after a flood ends).
func eventually(t *testing.T, what string, f func() error) {
	t.Helper()
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if err = f(); err == nil {
			return
		}
	}
	t.Fatalf("%s after the flood: %v", what, err)
}

// Under a descriptor limit of 256, 300 connections to each of the relay,
// the link, the CA and the verifier: every process stays up, serves a good
// request afterwards, and another VM's established session is not
// disturbed. (`cvtpm socket`: TestSocketSurvivesDescriptorExhaustion.)
func TestHostileDescriptorFlood(t *testing.T) {
	const limit, conns = 256, 300
	f := testenv.NewTopologyFiles(t, 0x7)
	caDir := filepath.Join(f.Dir, "ca")
	c := &caProc{Dir: caDir, Addr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)), HTTPAddr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))}
	c.Daemon = testenv.StartLimited(t, limit, "ca", []string{"tcp:" + c.Addr, "tcp:" + c.HTTPAddr}, "ca", "--dir", caDir, "--policy", f.Policy,
		"--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile), "--listen", c.Addr, "--http", c.HTTPAddr)
	c.Fingerprint = ca.Fingerprint(c.Root(t, ca.PurposeService).Raw)

	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	topo.Admin(t, "create", "vm2")
	topo.RestartBackendLimited(t, limit)
	relay := fmt.Sprintf("tcp:127.0.0.1:%d", testenv.FreePort(t))
	relayD := testenv.StartLimited(t, limit, "relay", []string{relay}, "frontend", "--backend", topo.LinkAddr, "--relay", relay)
	vAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	verifierD := testenv.StartLimited(t, limit, "verifier", []string{"tcp:" + vAddr}, "verifier",
		"--ek-root", c.RootFile(ca.PurposeEK), "--ak-root", c.RootFile(ca.PurposeAK), "--no-crl", "--policy", f.Policy,
		"--cert-dir", f.CertDir, "--token-key", filepath.Join(f.Dir, "verifier.key"), "--listen", vAddr, "--http", "")

	// Another VM's session, established before the floods.
	_, vm2 := topo.StartGuestProxy(t, topo.LinkAddr, "frontend", "vm2", f.Policy)
	getRandom := func(tcti string) error {
		_, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, "tpm2_getrandom", "--hex", "8")
		return err
	}
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + vm2}, "tpm2_startup", "-c")
	if err := getRandom(vm2); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		addr   string
		daemon *testenv.Daemon
		good   func() error
	}{
		{"frontend relay", strings.TrimPrefix(relay, "tcp:"), relayD, func() error {
			return linkGetRandom(f, strings.TrimPrefix(relay, "tcp:"))
		}},
		{"backend link", strings.TrimPrefix(topo.LinkAddr, "tcp:"), topo.Backend, func() error {
			return linkGetRandom(f, strings.TrimPrefix(topo.LinkAddr, "tcp:"))
		}},
		{"CA gRPC", c.Addr, c.Daemon, func() error {
			_, err := ca.Client{C: capb.NewCAClient(c.Conn(t))}.Challenge(ctx)
			return err
		}},
		{"verifier gRPC", vAddr, verifierD, func() error {
			conn, err := grpc.NewClient(vAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return err
			}
			defer conn.Close()
			_, err = attestpb.NewVerifierClient(conn).Challenge(ctx, &attestpb.ChallengeRequest{})
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rss := rssKiB(t, tc.daemon.Cmd.Process.Pid)
			held, release := flood("tcp", tc.addr, conns)
			time.Sleep(300 * time.Millisecond)
			if err := getRandom(vm2); err != nil {
				t.Errorf("another VM's session during the flood: %v", err)
			}
			release()
			if tc.daemon.Exited() {
				t.Fatalf("%s exited under %d connections with %d descriptors: %v\n%s", tc.name, held, limit, tc.daemon.Cmd.ProcessState, tc.daemon.Log)
			}
			eventually(t, "a good request to the "+tc.name, tc.good)
			t.Logf("%s: %d of %d connections held open (limit %d descriptors); alive, serving; RSS %d -> %d KiB",
				tc.name, held, conns, limit, rss, rssKiB(t, tc.daemon.Cmd.Process.Pid))
		})
	}
}

// linkGetRandom opens an attested session to addr as guest-vm1 and runs
// TPM2_GetRandom on vm1.
func linkGetRandom(f *testenv.TopologyFiles, addr string) error {
	cfg, err := attestedlink.LoadClientConfig(f.Certs["guest-vm1"][0], f.Certs["guest-vm1"][1], f.Policy)
	if err != nil {
		return err
	}
	cfg.Certs = csv.DirSource{Dir: f.CertDir}
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sess, err := attestedlink.Dial(ctx, conn, cfg)
	if err != nil {
		return err
	}
	defer sess.Close()
	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	out, err := sess.Call(ctx, "vm1", tpmrpc.AppendRequest(nil, tpmrpc.Request{Op: tpmrpc.OpExecute, Payload: getRandom}))
	if err != nil {
		return err
	}
	resp, err := tpmrpc.ParseResponse(out)
	if err != nil {
		return err
	}
	if len(resp.Payload) < 10 {
		return fmt.Errorf("short TPM response %x", resp.Payload)
	}
	return nil
}

// ctrlHeader is a control message header declaring a body of n bytes
// that never comes.
func ctrlHeader(cmd uint32, n uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, cmd)
	if cmd == 0x0d { // CMD_SET_STATEBLOB: flags, type, length
		b = binary.BigEndian.AppendUint32(b, 0)
		b = binary.BigEndian.AppendUint32(b, 1)
	}
	return binary.BigEndian.AppendUint32(b, n)
}

// 100 control connections declaring 16 MiB bodies (SET_STATEBLOB and
// HASH_DATA) that never arrive: `cvtpm socket` and the frontend's VM
// control socket grow by less than 64 MiB, and shrink back once they
// close.
func TestHostileControlBodies(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	ctrl := filepath.Join(f.Dir, "vm1.ctrl")
	front := testenv.StartDaemon(t, "frontend", []string{"unix:" + ctrl}, "frontend", "--backend", topo.LinkAddr,
		"--tls-cert", f.Certs["frontend"][0], "--tls-key", f.Certs["frontend"][1], "--policy", f.Policy, "--cert-dir", f.CertDir, "--vm", "vm1="+ctrl)
	sock := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	for _, tc := range []struct {
		name string
		path string
		pid  int
	}{
		{"cvtpm socket", sock.CtrlPath, sock.Cmd.Process.Pid},
		{"frontend", ctrl, front.Cmd.Process.Pid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := rssKiB(t, tc.pid)
			var conns []net.Conn
			for i := range 100 {
				c, err := net.Dial("unix", tc.path)
				if err != nil {
					continue
				}
				cmd := uint32(0x0d)
				if i%2 == 1 {
					cmd = 0x07 // CMD_HASH_DATA
				}
				c.Write(ctrlHeader(cmd, 16<<20))
				c.Write(make([]byte, 1000)) // a trickle of the body
				conns = append(conns, c)
			}
			time.Sleep(time.Second)
			during := rssKiB(t, tc.pid)
			for _, c := range conns {
				c.Close()
			}
			time.Sleep(2 * time.Second)
			after := rssKiB(t, tc.pid)
			t.Logf("%s: %d connections declaring 16 MiB: RSS %d KiB before, %d during, %d after", tc.name, len(conns), before, during, after)
			if during-before > 64<<10 {
				t.Errorf("%s grew by %d KiB (bound 64 MiB)", tc.name, during-before)
			}
			if after-before > 16<<10 {
				t.Errorf("%s kept %d KiB after the connections closed", tc.name, after-before)
			}
		})
	}
	if out := testenv.Run(t, []string{"TPM2TOOLS_TCTI=" + sock.TCTI()}, "tpm2_getrandom", "--hex", "4"); len(strings.TrimSpace(out)) != 8 {
		t.Fatalf("cvtpm socket after the storm: %q", out)
	}
}

// A state blob with a valid header and garbage inside is refused, and the
// stored state stays as it was: the NV index written before reads back,
// also after a restart.
func TestHostileGarbageStateBlob(t *testing.T) {
	dir := t.TempDir()
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: dir})
	tt := tools{tb: t, tcti: srv.TCTI(), dir: t.TempDir()}
	tt.run("tpm2_nvdefine", "0x1500030", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
	os.WriteFile(tt.path("secret"), []byte("precious"), 0o600)
	tt.run("tpm2_nvwrite", "0x1500030", "-C", "o", "-i", tt.path("secret"))
	ioctl := func(args ...string) (string, error) {
		return testenv.RunErr(nil, "swtpm_ioctl", append([]string{"--unix", srv.CtrlPath}, args...)...)
	}
	blob := tt.path("permanent")
	if out, err := ioctl("--save", "permanent", blob); err != nil {
		t.Fatalf("save: %v %s", err, out)
	}
	b, _ := os.ReadFile(blob)
	for i := 64; i < len(b) && i < 64+1000; i++ { // keep the header, garble the rest
		b[i] ^= byte(i*7 + 1)
	}
	os.WriteFile(blob, b, 0o600)
	before, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	ioctl("--stop")
	if out, err := ioctl("--load", "permanent", blob); err == nil {
		t.Errorf("a garbled permanent blob was accepted: %s", out)
	}
	ioctl("-i")
	testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + srv.TCTI()}, "tpm2_startup", "-c")
	after, _ := os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
	if len(before) > 0 && string(before) != string(after) {
		t.Error("the stored state changed though the blob was refused")
	}
	read := func() string {
		return testenv.Run(t, []string{"TPM2TOOLS_TCTI=" + srv.TCTI()}, "tpm2_nvread", "0x1500030", "-C", "o")
	}
	if got := read(); got != "precious" {
		t.Fatalf("NV after the refused blob: %q", got)
	}
	srv.Close()
	srv = testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: dir})
	if got := read(); got != "precious" {
		t.Fatalf("NV after a restart: %q", got)
	}
}

// The verifier: 200 Attest calls carrying two 1 MB certificates each
// leave its RSS within 64 MiB of where it started (certificates above
// 16 KiB are not parsed; only trusted ones are kept); 300 idle HTTP
// connections are closed within its header timeout (10 s).
func TestHostileVerifier(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	c := startCAProc(t, filepath.Join(f.Dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	vAddr, vHTTP := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)), fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	d := testenv.StartDaemon(t, "verifier", []string{"tcp:" + vAddr, "tcp:" + vHTTP}, "verifier",
		"--ek-root", c.RootFile(ca.PurposeEK), "--ak-root", c.RootFile(ca.PurposeAK), "--no-crl", "--policy", f.Policy,
		"--cert-dir", f.CertDir, "--token-key", filepath.Join(f.Dir, "verifier.key"), "--listen", vAddr, "--http", vHTTP)
	pid := d.Cmd.Process.Pid
	// 300 idle HTTP connections, opened first: the server must close
	// every one within its header timeout (10 s), slack included 15 s.
	idleStart := time.Now()
	idleClosed := make(chan time.Duration, 300)
	for range 300 {
		c, err := net.Dial("tcp", vHTTP)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		go func() {
			c.SetReadDeadline(idleStart.Add(15 * time.Second))
			_, err := bufio.NewReader(c).ReadByte()
			if err != nil && os.IsTimeout(err) {
				idleClosed <- -1
				return
			}
			idleClosed <- time.Since(idleStart)
		}()
	}

	conn, err := grpc.NewClient(vAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	v := attestpb.NewVerifierClient(conn)
	ctx := context.Background()
	before := rssKiB(t, pid)
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i)
	}
	for i := range 200 {
		ch, err := v.Challenge(ctx, &attestpb.ChallengeRequest{})
		if err != nil {
			t.Fatal(err)
		}
		big[0] = byte(i) // a new certificate each time
		_, err = v.Attest(ctx, &attestpb.AttestRequest{Nonce: ch.Nonce, Evidence: &attestpb.Evidence{EkChain: [][]byte{big, append([]byte{1}, big[1:]...)}}})
		if err != nil && status.Code(err) != codes.InvalidArgument {
			t.Fatalf("attest %d: %v", i, err)
		}
	}
	after := rssKiB(t, pid)
	t.Logf("verifier: 200 Attest calls with 2 x 1 MB certificates: RSS %d -> %d KiB", before, after)
	if after-before > 64<<10 {
		t.Errorf("verifier RSS grew by %d KiB (bound 64 MiB)", after-before)
	}
	if _, err := v.Challenge(ctx, &attestpb.ChallengeRequest{}); err != nil {
		t.Fatalf("a good request after the storm: %v", err)
	}
	var last time.Duration
	for range 300 {
		d := <-idleClosed
		if d < 0 {
			t.Fatal("an idle HTTP connection was still open after 15 s")
		}
		last = max(last, d)
	}
	t.Logf("verifier: 300 idle HTTP connections, all closed by the server after at most %v", last.Round(100*time.Millisecond))
	if d.Exited() {
		t.Fatal("the verifier exited")
	}
}

// 30 Enroll calls with a 3 MiB instance id (refused by the gRPC message
// limit) and 30 with a 100 KiB one (refused by the CA, recorded with the
// id clipped, within a rate) add less than 1 MiB to the audit log and the
// CA's log.
func TestHostileEnrollFlood(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	c := startCAProc(t, filepath.Join(f.Dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	audit := filepath.Join(c.Dir, "audit.jsonl")
	size := func() int64 {
		fi, _ := os.Stat(audit)
		if fi == nil {
			return 0
		}
		return fi.Size()
	}
	auditBefore, logBefore := size(), len(c.Log.String())
	client := ca.Client{C: capb.NewCAClient(c.Conn(t))}
	ctx := context.Background()
	for _, n := range []int{3 << 20, 100 << 10} {
		id := strings.Repeat("x", n)
		for range 30 {
			nonce, err := client.Challenge(ctx)
			if err != nil {
				t.Fatal(err)
			}
			_, err = client.Enroll(ctx, enroll.Request{InstanceID: id, EKPublicArea: []byte{1}, Nonce: nonce, Report: []byte{1}})
			if err == nil {
				t.Fatal("an enrollment with a garbage report was accepted")
			}
		}
	}
	auditGrowth, logGrowth := size()-auditBefore, len(c.Log.String())-logBefore
	t.Logf("CA: 60 refused enrollments with 3 MiB and 100 KiB instance ids: audit log +%d bytes, CA log +%d bytes", auditGrowth, logGrowth)
	if auditGrowth > 1<<20 || logGrowth > 1<<20 {
		t.Errorf("logs grew too much: audit +%d, log +%d (bound 1 MiB each)", auditGrowth, logGrowth)
	}
	entries, err := ca.ReadAudit(audit)
	if err != nil {
		t.Fatal(err)
	}
	refused := 0
	for _, e := range entries {
		if e.Decision == "refused" && strings.HasPrefix(e.InstanceID, "xxxx") {
			refused++
		}
	}
	// Malformed requests (no decision about any instance) are audited
	// within a rate per source: 10 in 10 s, the rest counted into the
	// next one recorded.
	if refused < 1 || refused > 10 {
		t.Errorf("the audit log records %d refusals of the 100 KiB id, want 1-10 (rate-limited per source)", refused)
	}
	if _, err := client.Challenge(ctx); err != nil {
		t.Fatalf("a good request after the storm: %v", err)
	}
}
