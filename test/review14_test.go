package test

// Review 14 (the workload leg, issue 14): attacks by the host on the
// combined verifier and on `cvtpm guest attest`.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/csv"
	"cvtpm/attest/verifier"
	"cvtpm/ca"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// review14Verifier is the verifier's public API as a network relay on the
// guest's path to it sees it (guest attest dials it in plaintext): it
// forwards challenges to the real verifier but answers every Attest with
// a token it kept from an earlier session.
type review14Verifier struct {
	attestpb.UnimplementedVerifierServer
	v      *verifier.Verifier
	replay string
	got    chan *attestpb.AttestRequest
}

func (r *review14Verifier) Challenge(ctx context.Context, _ *attestpb.ChallengeRequest) (*attestpb.ChallengeResponse, error) {
	n, exp, err := r.v.Challenge(ctx)
	if err != nil {
		return nil, err
	}
	return &attestpb.ChallengeResponse{Nonce: n, ExpiresUnix: exp.Unix()}, nil
}

func (r *review14Verifier) Attest(ctx context.Context, req *attestpb.AttestRequest) (*attestpb.AttestResponse, error) {
	select {
	case r.got <- req:
	default:
	}
	return &attestpb.AttestResponse{Ear: r.replay}, nil
}

// Finding 1: `cvtpm guest attest --verifier-key` checks the token's
// signature but not that the token answers its own challenge (eat_nonce),
// so a relay between the guest and the verifier (plaintext gRPC) replays
// any earlier AFFIRMING token, of this or any other instance, and the
// guest prints AFFIRMING "signature verified" and exits 0 for a state the
// verifier refuses: here a PCR extended behind the event log's back.
func TestReview14GuestAttestAcceptsReplayedToken(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	caDir := filepath.Join(f.Dir, "ca")
	caP := startCAProc(t, caDir, f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	e := &attestEnv{files: f, caDir: caDir, ca: caP, tpms: map[string]transport.TPMCloser{}, logs: map[string]*eventLog{}}
	e.caRoot, e.akRoot = caP.Root(t, ca.PurposeEK), caP.Root(t, ca.PurposeAK)
	e.topo = testenv.StartBackend(t, f, caP.ClientFlags()...)
	e.topo.Admin(t, "create", "--enroll", "vm1")
	_, tcti := e.topo.StartGuestProxy(t, e.topo.LinkAddr, "frontend", "vm1", f.Policy)
	port := tcti[strings.LastIndex(tcti, "=")+1:]
	ctx := context.Background()
	tpm, err := tpmsock.Dial(ctx, "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	e.tpms["vm1"] = tpm
	log := newEventLog()
	for _, c := range []string{"cvtpm test loader", "cvtpm test kernel"} {
		log.measure(t, tpm, 16, []byte(c))
	}
	e.logs["vm1"] = log
	e.caConn = caP.Conn(t)

	policy := &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(f.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{hex.EncodeToString(f.Measure[:])}}
	v, key := e.verifier(t, policy)

	// An earlier session, while the guest was still in its good state:
	// an affirming (warning: simulated CSV) token the relay keeps.
	n0, _, _ := v.Challenge(ctx)
	res0, err := v.Verify(ctx, n0, e.gather(t, "vm1", n0))
	if err != nil || !res0.Affirming() {
		t.Fatalf("earlier session: %+v %v", res0, err)
	}
	// Now PCR 16 is extended behind the log's back: the verifier refuses
	// this guest from here on (eventlog-does-not-match-pcrs).
	other := newEventLog()
	other.measure(t, tpm, 16, []byte("unlogged"))
	tpm.Close()

	mitm := &review14Verifier{v: v, replay: res0.Token, got: make(chan *attestpb.AttestRequest, 1)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	attestpb.RegisterVerifierServer(gs, mitm)
	go gs.Serve(ln)
	defer gs.Stop()

	dir := t.TempDir()
	logFile, pubFile := filepath.Join(dir, "events.log"), filepath.Join(dir, "verifier.pub.pem")
	os.WriteFile(logFile, log.bytes(), 0o600)
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	os.WriteFile(pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)

	out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "guest", "attest", "--tpm", "tcp:127.0.0.1:"+port,
		"--ca", caP.Addr, "--ca-fingerprint", caP.Fingerprint, "--verifier", ln.Addr().String(),
		"--event-log", logFile, "--verifier-key", pubFile)
	// The real verifier refuses what the guest sent.
	select {
	case req := <-mitm.got:
		res, verr := v.Verify(ctx, req.Nonce, req.Evidence)
		if verr != nil || res.Affirming() {
			t.Fatalf("the guest's own evidence should be refused: %+v %v", res, verr)
		}
		t.Logf("what the verifier says of the guest's evidence: %+v", res.Submods["cvtpm-vtpm"])
	default:
		t.Fatalf("guest attest sent no evidence: %v\n%s", err, out)
	}
	var ee *exec.ExitError
	if err == nil || !errors.As(err, &ee) {
		t.Fatalf("guest attest accepted a replayed token from an earlier session (exit 0, not its nonce):\n%s", out)
	}
}

// Finding 2: RequireWorkload (--require-workload) is enforced only by the
// built-in Rego policy. With --rego (an operator's policy judging the two
// legs it knows, such as the built-in policy before issue 14) evidence
// without any workload report passes as affirming although the verifier
// was told to refuse it.
func TestReview14RequireWorkloadOnlyInRego(t *testing.T) {
	e := startAttestEnv(t, "vm1")
	ctx := context.Background()
	platform := &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(e.files.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}}
	workloadPolicy := &csv.AppraisalPolicy{ApprovedMeasurements: []string{strings.Repeat("3c", 32)}}
	for _, p := range []*csv.AppraisalPolicy{platform, workloadPolicy} {
		if err := p.Compile(); err != nil {
			t.Fatal(err)
		}
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	v, err := verifier.New(ctx, verifier.Options{EKRoots: [][]byte{e.caRoot.Raw}, AKRoots: [][]byte{e.akRoot.Raw}, CRLs: e.crls(),
		CSV: platform, Workload: workloadPolicy, RequireWorkload: true, Signer: key, Policy: review14TwoLegPolicy})
	if err != nil {
		t.Fatal(err)
	}
	n, _, _ := v.Challenge(ctx)
	res, err := v.Verify(ctx, n, e.gather(t, "vm1", n)) // no workload report at all
	if err != nil {
		t.Fatal(err)
	}
	if res.Affirming() {
		t.Fatalf("RequireWorkload with a custom policy: evidence without a workload report affirmed: %+v (workload facts %+v)", res.Submods, res.Facts.Workload)
	}
}

// review14TwoLegPolicy is default.rego as it was before the workload leg
// (git show 5600d96^:attest/verifier/default.rego), the kind of policy an
// operator passes with --rego.
const review14TwoLegPolicy = `package cvtpm

nonce_reasons contains r if {
	not input.nonce.ok
	r := input.nonce.reason
}
vtpm_reasons contains r if some r in nonce_reasons
vtpm_reasons contains r if {
	not input.tpm.ek_trusted
	r := input.tpm.ek_reason
}
vtpm_reasons contains "ek-certificate-revoked" if input.tpm.ek_revoked
vtpm_reasons contains r if {
	not input.tpm.ak_bound
	r := input.tpm.ak_reason
}
vtpm_reasons contains r if {
	not input.tpm.quote_ok
	r := input.tpm.quote_reason
}
vtpm_reasons contains sprintf("pcr-%s-not-reference", [i]) if {
	input.tpm.quote_ok
	some i, want in data.reference.pcrs.sha256
	not pcr_matches(i, want)
}
pcr_matches(i, want) if lower(input.tpm.pcrs[i]) == lower(want)
csv_reasons contains r if some r in nonce_reasons
csv_reasons contains r if {
	not input.csv.report_ok
	r := input.csv.reason
}
csv_reasons contains ek_claims_reason if {
	input.csv.report_ok
	not input.csv.matches_ek_claims
}
default ek_claims_reason := "csv-report-from-another-backend"
ek_claims_reason := input.csv.ek_claims_reason if input.csv.ek_claims_reason != ""
csv_warnings contains "simulated-csv-evidence" if input.csv.simulated
status(reasons, warnings) := "contraindicated" if count(reasons) > 0
status(reasons, warnings) := "warning" if {
	count(reasons) == 0
	count(warnings) > 0
}
status(reasons, warnings) := "affirming" if {
	count(reasons) == 0
	count(warnings) == 0
}
result := {
	"cvtpm-vtpm": {"status": status(vtpm_reasons, set()), "reasons": vtpm_reasons},
	"csv-platform": {"status": status(csv_reasons, csv_warnings), "reasons": csv_reasons | csv_warnings},
}
`
