package test

// Issue 12, operable daemons: the backend, the CA and the verifier show
// their counters moving on /metrics, answer /healthz and /readyz, and
// the standard gRPC health check; logs come as JSON on request.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	attestpb "cvtpm/api/attest"
	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/attest/ear"
	"cvtpm/ca"
	"cvtpm/guestkit"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	r, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	return r.StatusCode, string(b)
}

// metric returns the sum of the samples of name whose labels contain
// every one of labels (`k="v"`).
func metric(text, name string, labels ...string) float64 {
	sum := 0.0
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `(\{[^}]*\})? ([0-9.e+-]+)$`)
	for _, m := range re.FindAllStringSubmatch(text, -1) {
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(m[1], l)
		}
		if v, err := strconv.ParseFloat(m[2], 64); ok && err == nil {
			sum += v
		}
	}
	return sum
}

func grpcHealthy(t *testing.T, conn *grpc.ClientConn, service string) {
	t.Helper()
	r, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: service})
	if err != nil || r.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC health of %q: %v %v", service, r, err)
	}
}

func TestOperability(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	c := startCAProc(t, filepath.Join(f.Dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	backendMetrics := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	topo := testenv.StartBackend(t, f, append(c.ClientFlags(), "--metrics", backendMetrics, "--log-format", "json")...)
	topo.Admin(t, "create", "--enroll", "vm1")
	_, tcti := topo.StartGuestProxy(t, topo.LinkAddr, "frontend", "vm1", f.Policy)
	tpm, err := tpmsock.Dial(context.Background(), "tcp", "127.0.0.1:"+tcti[strings.LastIndex(tcti, "=")+1:])
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	vAddr, vHTTP := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t)), fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	ref := filepath.Join(f.Dir, "reference.json")
	writeRef := func(pcr23 string) { os.WriteFile(ref, []byte(`{"pcrs": {"sha256": {"23": "`+pcr23+`"}}}`), 0o600) }
	writeRef(strings.Repeat("00", 32)) // PCR 23 as it starts
	vd := testenv.StartDaemon(t, "verifier", []string{"tcp:" + vAddr, "tcp:" + vHTTP}, "verifier", "--reference", ref,
		"--ek-root", c.RootFile(ca.PurposeEK), "--ak-root", c.RootFile(ca.PurposeAK),
		"--crl", c.CRLURL(ca.PurposeEK), "--crl", c.CRLURL(ca.PurposeAK), "--policy", f.Policy, "--cert-dir", f.CertDir,
		"--token-key", filepath.Join(f.Dir, "verifier.key"), "--listen", vAddr, "--http", vHTTP, "--log-format", "json")

	// One attestation, so every counter has something to count.
	vconn, err := grpc.NewClient(vAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer vconn.Close()
	vc := attestpb.NewVerifierClient(vconn)
	ctx := context.Background()
	attestOnce := func() *ear.EAR {
		t.Helper()
		ch, err := vc.Challenge(ctx, &attestpb.ChallengeRequest{})
		if err != nil {
			t.Fatal(err)
		}
		a := &guestkit.Attester{TPM: tpm, CA: ca.Client{C: capb.NewCAClient(c.Conn(t))}}
		ev, err := a.Gather(ctx, ch.Nonce)
		if err != nil {
			t.Fatal(err)
		}
		resp, err := vc.Attest(ctx, &attestpb.AttestRequest{Nonce: ch.Nonce, Evidence: ev})
		if err != nil {
			t.Fatal(err)
		}
		res, err := ear.ReadUnverified(resp.Ear)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	if got := attestOnce().Submods["cvtpm-vtpm"]; got.Status != "affirming" {
		t.Fatalf("first attestation: %+v", got)
	}

	for _, tc := range []struct {
		name, base string
		counters   [][]string // metric name and labels, each must be > 0
	}{
		{"backend", "http://" + backendMetrics, [][]string{{"cvtpm_backend_instances"}, {"cvtpm_backend_call_seconds_count", `op="execute"`}}},
		{"CA", "http://" + c.HTTPAddr, [][]string{{"cvtpm_ca_decisions_total", `kind="enroll"`, `decision="issued"`},
			{"cvtpm_ca_decisions_total", `kind="ak"`, `decision="issued"`}}},
		{"verifier", "http://" + vHTTP, [][]string{{"cvtpm_verifier_verdicts_total", `submodule="cvtpm-vtpm"`, `status="affirming"`}}},
	} {
		code, text := httpGet(t, tc.base+"/metrics")
		if code != 200 {
			t.Fatalf("%s /metrics: %d", tc.name, code)
		}
		for _, m := range tc.counters {
			if v := metric(text, m[0], m[1:]...); v <= 0 {
				t.Errorf("%s: %v = %v, want > 0", tc.name, m, v)
			}
		}
		for _, p := range []string{"/healthz", "/readyz"} {
			if code, body := httpGet(t, tc.base+p); code != 200 {
				t.Errorf("%s %s: %d %s", tc.name, p, code, body)
			}
		}
	}
	grpcHealthy(t, c.Conn(t), "cvtpm.ca.v1.CA")
	grpcHealthy(t, vconn, "cvtpm.attest.v1.Verifier")
	admin, err := grpc.NewClient("unix://"+topo.AdminSock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	grpcHealthy(t, admin, "")

	// --log-format json: every line an object with level and msg.
	for name, log := range map[string]string{"backend": topo.Backend.Log.String(), "verifier": vd.Log.String()} {
		lines := 0
		for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
			if !strings.HasPrefix(l, "{") {
				continue // the CA fingerprint line and the like are not log lines
			}
			var m map[string]any
			if err := json.Unmarshal([]byte(l), &m); err != nil || m["level"] == nil || m["msg"] == nil {
				t.Errorf("%s log line is not a JSON record: %q", name, l)
			}
			lines++
		}
		if lines == 0 {
			t.Errorf("%s logged no JSON lines:\n%s", name, log)
		}
	}
	// SIGHUP: new reference values take effect; a malformed file is
	// refused and the values in force stay.
	hup := func(d *testenv.Daemon, want string, n int) {
		t.Helper()
		d.Cmd.Process.Signal(syscall.SIGHUP)
		for i := 0; strings.Count(d.Log.String(), want) < n; i++ {
			if i > 100 {
				t.Fatalf("no %q after SIGHUP:\n%s", want, d.Log)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	writeRef(strings.Repeat("ff", 32))
	hup(vd, "SIGHUP: reloaded", 1)
	if got := attestOnce().Submods["cvtpm-vtpm"]; got.Status != "contraindicated" || !slices.Contains(got.Reasons, "pcr-23-not-reference") {
		t.Fatalf("after the reload: %+v", got)
	}
	os.WriteFile(ref, []byte(`{"pcr": {}}`), 0o600)
	hup(vd, "reload refused", 1)
	if got := attestOnce().Submods["cvtpm-vtpm"]; !slices.Contains(got.Reasons, "pcr-23-not-reference") {
		t.Fatalf("after a refused reload: %+v", got)
	}
	// The backend's ACL: the "frontend" identity loses vm1 at once, also
	// on its open session.
	os.WriteFile(f.ACL, []byte(`{"clients": {"guest-vm1": {"instances": ["vm1"], "capabilities": ["guest"]}}}`), 0o600)
	hup(topo.Backend, "SIGHUP: reloaded", 1)
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err == nil {
		t.Fatal("the frontend identity still uses vm1 after it left the ACL")
	}

	// A bad log level is refused, naming the flag.
	out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "verifier", "--log-level", "loud", "--ek-root", c.RootFile(ca.PurposeEK),
		"--ak-root", c.RootFile(ca.PurposeAK), "--no-crl", "--policy", f.Policy, "--token-key", filepath.Join(f.Dir, "v2.key"))
	if err == nil || !strings.Contains(out, "--log-level") {
		t.Fatalf("--log-level loud: %v %s", err, out)
	}
}

// A daemon run as its systemd unit would: flags from --config, readiness
// on $NOTIFY_SOCKET; and every unit in contrib/systemd passes
// `systemd-analyze verify`.
func TestServiceUnitsAndConfig(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	c := startCAProc(t, filepath.Join(f.Dir, "ca"), f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	vAddr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(t))
	conf := filepath.Join(f.Dir, "verifier.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`# as /etc/cvtpm/verifier.conf
ek-root = %s
ak-root = %s
crl = %s
crl = %s
policy = %s
cert-dir = %s
token-key = %s
listen = %s
http =
log-format = json
`, c.RootFile(ca.PurposeEK), c.RootFile(ca.PurposeAK), c.CRLURL(ca.PurposeEK), c.CRLURL(ca.PurposeAK), f.Policy, f.CertDir,
		filepath.Join(f.Dir, "v.key"), vAddr)), 0o600)
	notify := filepath.Join(testenv.SockDir(t), "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", notify)
	testenv.StartDaemon(t, "verifier", []string{"tcp:" + vAddr}, "verifier", "--config", conf)
	ln.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	n, err := ln.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Fatalf("systemd readiness: %q %v", buf[:n], err)
	}
	// A misspelt setting in the file is refused by file and line.
	os.WriteFile(conf, []byte("ek-rot = x\n"), 0o600)
	out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "verifier", "--config", conf)
	if err == nil || !strings.Contains(out, "line 1") || !strings.Contains(out, "ek-rot") {
		t.Fatalf("misspelt config: %v %s", err, out)
	}
	// The units.
	analyze := testenv.Tool(t, "systemd-analyze")
	units, _ := filepath.Glob(filepath.Join(testenv.RepoRoot(), "contrib", "systemd", "*.service"))
	if len(units) != 4 {
		t.Fatalf("units: %v", units)
	}
	dir := t.TempDir()
	for _, u := range units {
		b, _ := os.ReadFile(u)
		local := filepath.Join(dir, filepath.Base(u))
		os.WriteFile(local, []byte(strings.ReplaceAll(string(b), "/usr/local/bin/cvtpm", testenv.Binary(t, testenv.Cvtpm))), 0o644)
		if out, err := testenv.RunErr(nil, analyze, "verify", local); err != nil {
			t.Errorf("systemd-analyze verify %s: %v\n%s", filepath.Base(u), err, out)
		}
	}
}
