package test

// Issue 6 end to end: an enrolled backend instance, evidence gathered
// through the guest proxy (guestkit.Attester), appraised by the combined
// verifier; one refusal per way the evidence can be wrong.

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	tpmtoolspb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm-tools/server"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/attest/ear"
	"cvtpm/attest/freshreport"
	"cvtpm/attest/verifier"
	"cvtpm/attest/workload"
	"cvtpm/ca"
	"cvtpm/guestkit"
	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// attestEnv is an EK CA, a backend with enrolled instances and a way to
// gather evidence from each.
type attestEnv struct {
	files  *testenv.TopologyFiles
	topo   *testenv.Topology
	ca     *caProc
	caDir  string
	caRoot *x509.Certificate // EK root
	akRoot *x509.Certificate
	caConn *grpc.ClientConn
	tpms   map[string]transport.TPMCloser
	logs   map[string]*eventLog
}

func startAttestEnv(t testing.TB, instances ...string) *attestEnv {
	t.Helper()
	f := testenv.NewTopologyFiles(t, 0x7)
	e := &attestEnv{files: f, caDir: filepath.Join(f.Dir, "ca"), tpms: map[string]transport.TPMCloser{}, logs: map[string]*eventLog{}}
	e.ca = startCAProc(t, e.caDir, f.Policy, "--hsk-cek", filepath.Join(f.SimDir, csv.SimHSKCEKFile))
	e.caRoot, e.akRoot = e.ca.Root(t, ca.PurposeEK), e.ca.Root(t, ca.PurposeAK)
	e.topo = testenv.StartBackend(t, f, e.ca.ClientFlags()...)
	for _, id := range instances {
		e.topo.Admin(t, "create", "--enroll", id)
		_, tcti := e.topo.StartGuestProxy(t, e.topo.LinkAddr, "frontend", id, f.Policy)
		port := tcti[strings.LastIndex(tcti, "=")+1:]
		tpm, err := tpmsock.Dial(context.Background(), "tcp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tpm.Close() })
		e.tpms[id] = tpm
		// "Boot": measure two components into PCR 16 and log them.
		log := newEventLog()
		for _, c := range []string{"cvtpm test loader " + id, "cvtpm test kernel"} {
			log.measure(t, tpm, 16, []byte(c))
		}
		e.logs[id] = log
	}
	e.caConn = e.ca.Conn(t)
	return e
}

func (e *attestEnv) gather(t testing.TB, id string, nonce []byte) *attestpb.Evidence {
	t.Helper()
	a := &guestkit.Attester{TPM: e.tpms[id], CA: ca.Client{C: capb.NewCAClient(e.caConn)}, EventLog: e.logs[id].bytes()}
	ev, err := a.Gather(context.Background(), nonce)
	if err != nil {
		t.Fatalf("gathering evidence on %s: %v", id, err)
	}
	return ev
}

func (e *attestEnv) verifier(t *testing.T, csvPolicy *csv.AppraisalPolicy) (*verifier.Verifier, *ecdsa.PrivateKey) {
	t.Helper()
	return e.verifierWith(t, csvPolicy, nil)
}

// verifierWith is verifier with reference values for the policy.
func (e *attestEnv) verifierWith(t *testing.T, csvPolicy *csv.AppraisalPolicy, reference map[string]any) (*verifier.Verifier, *ecdsa.PrivateKey) {
	t.Helper()
	if csvPolicy == nil {
		csvPolicy = &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(e.files.SimDir, csv.SimRootFile)},
			ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}}
	}
	if err := csvPolicy.Compile(); err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	v, err := verifier.New(context.Background(), verifier.Options{EKRoots: [][]byte{e.caRoot.Raw}, AKRoots: [][]byte{e.akRoot.Raw},
		CRLs: e.crls(), CSV: csvPolicy, Signer: key, Reference: reference})
	if err != nil {
		t.Fatal(err)
	}
	return v, key
}

// crls are the EK and AK issuers' CRLs.
func (e *attestEnv) crls() []verifier.CRLSource {
	return []verifier.CRLSource{verifier.HTTPCRL{URL: e.ca.CRLURL(ca.PurposeEK)}, verifier.HTTPCRL{URL: e.ca.CRLURL(ca.PurposeAK)}}
}

// eventLog records measurements as firmware would (guestkit.EventLog).
type eventLog struct{ l *guestkit.EventLog }

func newEventLog() *eventLog { return &eventLog{guestkit.NewEventLog()} }

func (l *eventLog) measure(t testing.TB, tpm transport.TPM, pcr uint32, data []byte) {
	t.Helper()
	if err := l.l.Measure(tpm, pcr, guestkit.EventIPL, data); err != nil {
		t.Fatal(err)
	}
}

func (l *eventLog) bytes() []byte { return l.l.Bytes() }

// editAttestation rewrites the go-tpm-tools part of evidence.
func editAttestation(t *testing.T, ev *attestpb.Evidence, edit func(*tpmtoolspb.Attestation)) *attestpb.Evidence {
	t.Helper()
	att := &tpmtoolspb.Attestation{}
	if err := proto.Unmarshal(ev.TpmAttestation, att); err != nil {
		t.Fatal(err)
	}
	edit(att)
	out := proto.Clone(ev).(*attestpb.Evidence)
	raw, err := proto.Marshal(att)
	if err != nil {
		t.Fatal(err)
	}
	out.TpmAttestation = raw
	return out
}

func TestCombinedVerifier(t *testing.T) {
	e := startAttestEnv(t, "vm1", "vm2")
	v, key := e.verifier(t, nil)
	ctx := context.Background()
	challenge := func() []byte {
		n, _, err := v.Challenge(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	// The positive case, and the token a relying party reads.
	nonce := challenge()
	good := e.gather(t, "vm1", nonce)
	res, err := v.Verify(ctx, nonce, good)
	if err != nil {
		t.Fatal(err)
	}
	if res.Submods["cvtpm-vtpm"].Status != verifier.StatusAffirming || res.Submods["csv-platform"].Status != verifier.StatusWarning ||
		!slices.Equal(res.Submods["csv-platform"].Reasons, []string{"simulated-csv-evidence"}) {
		t.Fatalf("good evidence: %+v\nfacts: %+v", res.Submods, res.Facts)
	}
	t.Logf("good evidence: %+v; PCR16=%s", res.Submods, res.Facts.TPM.PCRs["16"])
	tok, err := ear.Parse(res.Token, &key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Submods["csv-platform"].Evidence["measurement"] != hex.EncodeToString(e.files.Measure[:]) {
		t.Fatalf("token claims: %+v", tok.Submods)
	}

	// Material for the refusals.
	staleNonce := challenge()
	stale := e.gather(t, "vm1", staleNonce)
	otherCA := selfIssued(t, good.EkChain[0])
	sim2, _ := csv.NewSimulator("SIMOTHER9")
	sim2.SetVM(csv.VMConfig{Version: 1, Measure: e.files.Measure, Policy: 0x7})
	sim2Root := filepath.Join(t.TempDir(), "sim2-hrk.cert")
	os.WriteFile(sim2Root, sim2.HRK.Marshal(), 0o600)

	type refusal struct {
		name     string
		submod   string
		reason   string
		evidence func(nonce []byte) *attestpb.Evidence
		verifier *verifier.Verifier
		nonce    []byte // default: a fresh challenge
	}
	realOnly, _ := e.verifier(t, &csv.AppraisalPolicy{ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}})
	bothRoots, _ := e.verifier(t, &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(e.files.SimDir, csv.SimRootFile), sim2Root},
		ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}})
	// A link identity the same CA issued (a software key), from its
	// identity root: neither the EK nor the AK root vouches for it.
	idCert, idKey := filepath.Join(t.TempDir(), "id.pem"), filepath.Join(t.TempDir(), "id.key")
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "ca", "identity", "--dir", e.caDir, "--name", "impostor", "--out-cert", idCert, "--out-key", idKey)
	idPEM, _ := os.ReadFile(idCert)
	idBlock, _ := pem.Decode(idPEM)
	cases := []refusal{
		{"link identity presented as the EK certificate", "cvtpm-vtpm", "ek-certificate-untrusted", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			ev.EkChain = [][]byte{idBlock.Bytes}
			return ev
		}, nil, nil},
		{"link identity presented as the AK certificate", "cvtpm-vtpm", "ak-certificate-untrusted", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			return editAttestation(t, ev, func(a *tpmtoolspb.Attestation) { a.AkCert = idBlock.Bytes })
		}, nil, nil},
		{"AK certificate presented as the EK certificate", "cvtpm-vtpm", "ek-certificate-untrusted", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			att := &tpmtoolspb.Attestation{}
			if err := proto.Unmarshal(ev.TpmAttestation, att); err != nil {
				t.Fatal(err)
			}
			ev.EkChain = [][]byte{att.AkCert}
			return ev
		}, nil, nil},
		{"PCR changed after the quote", "cvtpm-vtpm", "pcrs-do-not-match-quote", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			return editAttestation(t, ev, func(a *tpmtoolspb.Attestation) { a.Quotes[0].Pcrs.Pcrs[16][0] ^= 1 })
		}, nil, nil},
		{"edited event log", "cvtpm-vtpm", "eventlog-does-not-match-pcrs", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			return editAttestation(t, ev, func(a *tpmtoolspb.Attestation) {
				// Replace the last event's digest: the log now claims
				// another kernel than the one measured.
				a.EventLog[len(a.EventLog)-len("cvtpm test kernel")-4-32+5] ^= 1
			})
		}, nil, nil},
		{"AK not bound to the EK", "cvtpm-vtpm", "ak-not-bound-to-ek", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm2", n)
			ev.EkChain = good.EkChain // vm1's EK with vm2's AK and quote
			return ev
		}, nil, nil},
		{"EK certificate from another CA", "cvtpm-vtpm", "ek-certificate-untrusted", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			ev.EkChain = [][]byte{otherCA}
			return ev
		}, nil, nil},
		{"CSV report from another instance", "csv-platform", "csv-report-for-another-ek", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			other := e.gather(t, "vm2", n)
			ev.CsvReport, ev.EkPublic, ev.InstanceId = other.CsvReport, other.EkPublic, other.InstanceId
			return ev
		}, nil, nil},
		{"CSV report from another backend", "csv-platform", "csv-report-from-another-backend", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			rd := freshreport.ReportData(n, ev.EkPublic, ev.InstanceId)
			rep, err := sim2.Report(ctx, rd[:])
			if err != nil {
				t.Fatal(err)
			}
			ev.CsvReport, ev.CsvHskCek = rep, csv.MarshalHSKCEK(sim2.HSK, sim2.CEK)
			return ev
		}, bothRoots, nil},
		{"CSV report for a stale nonce", "csv-platform", "csv-report-not-bound-to-this-nonce-ek-and-instance", func(n []byte) *attestpb.Evidence {
			ev := e.gather(t, "vm1", n)
			ev.CsvReport = stale.CsvReport
			return ev
		}, nil, nil},
		{"simulated root, only the real HRK trusted", "csv-platform", csv.ReasonUntrustedRoot, func(n []byte) *attestpb.Evidence {
			return e.gather(t, "vm1", n)
		}, realOnly, nil},
		{"reused nonce", "cvtpm-vtpm", "nonce-unknown-or-used", func([]byte) *attestpb.Evidence { return good }, nil, nonce},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			vv := v
			if tc.verifier != nil {
				vv = tc.verifier
			}
			n := tc.nonce
			if n == nil {
				var err error
				if n, _, err = vv.Challenge(ctx); err != nil {
					t.Fatal(err)
				}
			}
			res, err := vv.Verify(ctx, n, tc.evidence(n))
			if err != nil {
				t.Fatal(err)
			}
			s := res.Submods[tc.submod]
			if s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, tc.reason) {
				t.Fatalf("%s = %+v, want contraindicated for %q\nfacts: %+v", tc.submod, s, tc.reason, res.Facts)
			}
			if res.Affirming() {
				t.Fatal("result affirming")
			}
		})
	}

	// Reference values (data.reference.pcrs.sha256): the measured PCR 16
	// affirms; another value refuses, also when the evidence adds an
	// unsigned quote (SHA-256 or SHA-1 bank) that carries it.
	measured := res.Facts.TPM.PCRs["16"]
	if len(measured) != 64 {
		t.Fatalf("PCR 16 in the facts = %q, want the SHA-256 bank's value", measured)
	}
	reference := func(v string) map[string]any {
		return map[string]any{"pcrs": map[string]any{"sha256": map[string]any{"16": v}}}
	}
	forged := strings.Repeat("ab", 32)
	forgedBytes, _ := hex.DecodeString(forged)
	for _, tc := range []struct {
		name, reference string
		edit            func(*tpmtoolspb.Attestation)
		wantReason      string
	}{
		{"measured PCR 16", measured, nil, ""},
		{"another PCR 16", forged, nil, "pcr-16-not-reference"},
		{"another PCR 16 in an added SHA-256 quote", forged, func(a *tpmtoolspb.Attestation) {
			q := proto.Clone(a.Quotes[0]).(*tpmpb.Quote)
			q.Pcrs.Pcrs[16] = forgedBytes
			a.Quotes = append(a.Quotes, q)
		}, "pcr-16-not-reference"},
		{"another PCR 16 in an added SHA-1 quote", forged, func(a *tpmtoolspb.Attestation) {
			q := proto.Clone(a.Quotes[0]).(*tpmpb.Quote)
			q.Pcrs.Hash = tpmpb.HashAlgo_SHA1
			q.Pcrs.Pcrs[16] = forgedBytes
			a.Quotes = append(a.Quotes, q)
		}, "pcr-16-not-reference"},
	} {
		t.Run("reference/"+tc.name, func(t *testing.T) {
			rv, _ := e.verifierWith(t, nil, reference(tc.reference))
			n, _, err := rv.Challenge(ctx)
			if err != nil {
				t.Fatal(err)
			}
			ev := e.gather(t, "vm1", n)
			if tc.edit != nil {
				ev = editAttestation(t, ev, tc.edit)
			}
			res, err := rv.Verify(ctx, n, ev)
			if err != nil {
				t.Fatal(err)
			}
			s := res.Submods["cvtpm-vtpm"]
			if tc.wantReason == "" && s.Status != verifier.StatusAffirming ||
				tc.wantReason != "" && (s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, tc.wantReason)) {
				t.Fatalf("cvtpm-vtpm = %+v, want reason %q\nfacts: %+v", s, tc.wantReason, res.Facts.TPM)
			}
		})
	}

	// Revocation: revoke vm2's EK certificate; its evidence is refused.
	n := challenge()
	ev2 := e.gather(t, "vm2", n)
	cert2, _ := x509.ParseCertificate(ev2.EkChain[0])
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "ca", "revoke", "--dir", e.caDir, cert2.SerialNumber.Text(16))
	res, err = v.Verify(ctx, n, ev2)
	if err != nil {
		t.Fatal(err)
	}
	if s := res.Submods["cvtpm-vtpm"]; s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, "ek-certificate-revoked") {
		t.Fatalf("revoked EK: %+v", s)
	}
	// And an AK certificate revoked on its own issuer's CRL (/crl/ak).
	n = challenge()
	ev1 := e.gather(t, "vm1", n)
	att := &tpmtoolspb.Attestation{}
	if err := proto.Unmarshal(ev1.TpmAttestation, att); err != nil {
		t.Fatal(err)
	}
	akCert, _ := x509.ParseCertificate(att.AkCert)
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "ca", "revoke", "--dir", e.caDir, akCert.SerialNumber.Text(16))
	if res, err = v.Verify(ctx, n, ev1); err != nil {
		t.Fatal(err)
	}
	if s := res.Submods["cvtpm-vtpm"]; s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, "ak-certificate-revoked") {
		t.Fatalf("revoked AK: %+v", s)
	}
}

// selfIssued makes a certificate for the same key as certDER, signed by a
// throwaway CA: "an EK certificate from another CA".
func selfIssued(t *testing.T, certDER []byte) []byte {
	t.Helper()
	orig, err := x509.ParseCertificate(certDER)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "another EK CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	caCert, _ := x509.ParseCertificate(caDER)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(8), NotBefore: orig.NotBefore, NotAfter: orig.NotAfter,
		ExtraExtensions: orig.Extensions}
	der, err := x509.CreateCertificate(rand.Reader, leaf, caCert, orig.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// tpmChannel is go-attestation's command channel over a go-tpm transport
// (one Read returns the whole response).
type tpmChannel struct {
	t    transport.TPM
	resp []byte
}

func (c *tpmChannel) Write(cmd []byte) (int, error) {
	r, err := c.t.Send(cmd)
	c.resp = r
	return len(cmd), err
}

func (c *tpmChannel) Read(p []byte) (int, error) {
	if len(c.resp) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.resp)
	c.resp = c.resp[n:]
	return n, nil
}
func (c *tpmChannel) Close() error                    { return nil }
func (c *tpmChannel) MeasurementLog() ([]byte, error) { return nil, nil }

// Interop: verifiers that know nothing of cvtpm accept a cvtpm instance.
func TestInteropVerifiers(t *testing.T) {
	e := startAttestEnv(t, "vm1")
	ctx := context.Background()
	nonce := []byte("interop verifier nonce 0123456789")
	ev := e.gather(t, "vm1", nonce)

	// go-tpm-tools: the TPM part, trusting AKs by chain to the CA root.
	att := &tpmtoolspb.Attestation{}
	if err := proto.Unmarshal(ev.TpmAttestation, att); err != nil {
		t.Fatal(err)
	}
	if _, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: nonce, TrustedRootCerts: []*x509.Certificate{e.akRoot}}); err != nil {
		t.Fatalf("go-tpm-tools VerifyAttestation with the AK root: %v", err)
	}
	// A relying party that trusts the EK and AK roots does not take a link
	// identity (a software key the host may hold) for an AK: quotes it
	// signs do not verify.
	idCert, idKey := filepath.Join(t.TempDir(), "id.pem"), filepath.Join(t.TempDir(), "id.key")
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "ca", "identity", "--dir", e.caDir, "--name", "frontend", "--out-cert", idCert, "--out-key", idKey)
	idPEM, _ := os.ReadFile(idCert)
	idBlock, _ := pem.Decode(idPEM)
	forged := proto.Clone(att).(*tpmtoolspb.Attestation)
	forged.AkCert = idBlock.Bytes
	if _, err := server.VerifyAttestation(forged, server.VerifyOpts{Nonce: nonce, TrustedRootCerts: []*x509.Certificate{e.caRoot, e.akRoot}}); err == nil {
		t.Fatal("go-tpm-tools accepted a link identity certificate as the AK certificate under the EK and AK roots")
	}
	// openssl: EK and AK certificates verify under their own roots (not
	// under each other's), a link identity under neither; the EKUs show.
	dir := t.TempDir()
	writePEMFile := func(name string, der ...[]byte) string {
		var b []byte
		for _, d := range der {
			b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: d})...)
		}
		p := filepath.Join(dir, name)
		os.WriteFile(p, b, 0o600)
		return p
	}
	ekPEM, akPEM := writePEMFile("ek.pem", ev.EkChain[0]), writePEMFile("ak.pem", att.AkCert)
	ekRoot, akRoot := writePEMFile("ek-root.pem", e.caRoot.Raw), writePEMFile("ak-root.pem", e.akRoot.Raw)
	bothRoots := writePEMFile("roots.pem", e.caRoot.Raw, e.akRoot.Raw)
	for _, tc := range []struct {
		cert, roots string
		ok          bool
	}{{ekPEM, ekRoot, true}, {akPEM, akRoot, true}, {ekPEM, akRoot, false}, {akPEM, ekRoot, false}, {idCert, bothRoots, false}} {
		out, err := testenv.RunErr(nil, "openssl", "verify", "-CAfile", tc.roots, tc.cert)
		if (err == nil && strings.Contains(out, ": OK")) != tc.ok {
			t.Errorf("openssl verify -CAfile %s %s: %v\n%s (want ok=%v)", filepath.Base(tc.roots), filepath.Base(tc.cert), err, out, tc.ok)
		}
	}
	for _, tc := range []struct{ cert, want string }{
		{ekPEM, "2.23.133.8.1"}, {akPEM, "2.23.133.8.3"}, {idCert, "TLS Web Client Authentication, TLS Web Server Authentication"},
	} {
		if text := testenv.Run(t, nil, "openssl", "x509", "-in", tc.cert, "-noout", "-text"); !strings.Contains(text, tc.want) {
			t.Errorf("%s lacks %q:\n%s", filepath.Base(tc.cert), tc.want, text)
		}
	}

	// go-attestation's public API only, as a remote verifier would use it.
	ekCert, err := attest.ParseEKCertificate(ev.EkChain[0])
	if err != nil {
		t.Fatalf("ParseEKCertificate: %v", err)
	}
	if err := ekCert.CheckSignatureFrom(e.caRoot); err != nil {
		t.Fatalf("EK certificate does not chain to the CA: %v", err)
	}
	tpm, err := attest.OpenTPM(&attest.OpenConfig{CommandChannel: &tpmChannel{t: e.tpms["vm1"]}})
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	ak, err := tpm.NewAK(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ak.Close(tpm)
	params := ak.AttestationParameters()
	secret, ec, err := (&attest.ActivationParameters{EK: ekCert.PublicKey, AK: params}).Generate()
	if err != nil {
		t.Fatalf("ActivationParameters.Generate: %v", err)
	}
	got, err := ak.ActivateCredential(tpm, *ec)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("credential activation: %v (secret matches: %v)", err, bytes.Equal(got, secret))
	}
	akPub, err := attest.ParseAKPublic(params.Public)
	if err != nil {
		t.Fatal(err)
	}
	q, err := ak.Quote(tpm, nonce, attest.HashSHA256)
	if err != nil {
		t.Fatal(err)
	}
	pcrs, err := tpm.PCRs(attest.HashSHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := akPub.Verify(*q, pcrs, nonce); err != nil {
		t.Fatalf("AKPublic.Verify: %v", err)
	}
	el, err := attest.ParseEventLog(e.logs["vm1"].bytes())
	if err != nil {
		t.Fatalf("ParseEventLog: %v", err)
	}
	events, err := el.Verify(pcrs)
	if err != nil {
		t.Fatalf("EventLog.Verify: %v", err)
	}
	if len(events) != 2 {
		t.Fatalf("verified %d events, want 2", len(events))
	}
	_ = ctx
}

// The workload leg: the workload VM's own CSV report, bound to the nonce
// and the AK, in the same verdict as the vTPM's quote and its backend's
// report. One refusal per way it can be wrong, each named in the EAR
// token's csv-workload submodule.
func TestWorkloadLeg(t *testing.T) {
	e := startAttestEnv(t, "vm1")
	ctx := context.Background()
	dir := t.TempDir()
	workloadMeasure := [32]byte{0x3c, 0x3c}
	newWorkload := func(name string, measure [32]byte, policy uint32) *csv.Simulator {
		s, err := csv.NewSimulator(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetVM(csv.VMConfig{Version: 1, Measure: measure, Policy: policy}); err != nil {
			t.Fatal(err)
		}
		return s
	}
	good := newWorkload("SIMWORK01", workloadMeasure, 0x7)
	root := filepath.Join(dir, "workload-hrk.cert")
	os.WriteFile(root, good.HRK.Marshal(), 0o600)
	newVerifier := func(p *csv.AppraisalPolicy, require bool) *verifier.Verifier {
		if err := p.Compile(); err != nil {
			t.Fatal(err)
		}
		platform := &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(e.files.SimDir, csv.SimRootFile)},
			ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}}
		if err := platform.Compile(); err != nil {
			t.Fatal(err)
		}
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		v, err := verifier.New(ctx, verifier.Options{EKRoots: [][]byte{e.caRoot.Raw}, AKRoots: [][]byte{e.akRoot.Raw}, CRLs: e.crls(),
			CSV: platform, Workload: p, RequireWorkload: require, Signer: key})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	simPolicy := &csv.AppraisalPolicy{SimulatorRoots: []string{root}, ApprovedMeasurements: []string{hex.EncodeToString(workloadMeasure[:])}}
	v := newVerifier(simPolicy, true)
	realOnly := newVerifier(&csv.AppraisalPolicy{ApprovedMeasurements: []string{hex.EncodeToString(workloadMeasure[:])}}, true)
	otherImage := newVerifier(&csv.AppraisalPolicy{SimulatorRoots: []string{root}, ApprovedMeasurements: []string{strings.Repeat("77", 32)}}, true)
	gather := func(n []byte, w *csv.Simulator) *attestpb.Evidence {
		a := &guestkit.Attester{TPM: e.tpms["vm1"], CA: ca.Client{C: capb.NewCAClient(e.caConn)}, EventLog: e.logs["vm1"].bytes()}
		if w != nil {
			a.Workload, a.WorkloadHSKCEK = w, csv.MarshalHSKCEK(w.HSK, w.CEK)
		}
		ev, err := a.Gather(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		return ev
	}
	akPub := func(ev *attestpb.Evidence) []byte {
		att := &tpmtoolspb.Attestation{}
		if err := proto.Unmarshal(ev.TpmAttestation, att); err != nil {
			t.Fatal(err)
		}
		return att.AkPub
	}
	rebind := func(ev *attestpb.Evidence, nonce, ak []byte) *attestpb.Evidence {
		rd := workload.ReportData(nonce, ak)
		r, err := good.Report(ctx, rd[:])
		if err != nil {
			t.Fatal(err)
		}
		ev.WorkloadReport = r
		return ev
	}
	other := gather(make([]byte, 32), nil) // another AK of the same TPM (another session)
	for _, tc := range []struct {
		name     string
		v        *verifier.Verifier
		evidence func(n []byte) *attestpb.Evidence
		status   string
		reason   string
	}{
		{"all three legs", v, func(n []byte) *attestpb.Evidence { return gather(n, good) }, verifier.StatusWarning, "simulated-csv-evidence"},
		{"missing when required", v, func(n []byte) *attestpb.Evidence { return gather(n, nil) }, verifier.StatusContraindicated, "workload-evidence-missing"},
		{"report for another nonce", v, func(n []byte) *attestpb.Evidence {
			ev := gather(n, good)
			return rebind(ev, []byte("an earlier session's nonce 0123"), akPub(ev))
		}, verifier.StatusContraindicated, "workload-report-not-bound-to-this-nonce-and-ak"},
		{"report for another AK", v, func(n []byte) *attestpb.Evidence {
			return rebind(gather(n, good), n, akPub(other))
		}, verifier.StatusContraindicated, "workload-report-not-bound-to-this-nonce-and-ak"},
		{"debug policy", v, func(n []byte) *attestpb.Evidence {
			// The same chip running a guest whose policy allows debugging.
			good.SetVM(csv.VMConfig{Version: 1, Measure: workloadMeasure, Policy: 0x6})
			defer good.SetVM(csv.VMConfig{Version: 1, Measure: workloadMeasure, Policy: 0x7})
			return gather(n, good)
		}, verifier.StatusContraindicated, "workload-" + csv.ReasonDebug},
		{"unapproved workload measurement", otherImage, func(n []byte) *attestpb.Evidence { return gather(n, good) }, verifier.StatusContraindicated, "workload-" + csv.ReasonMeasurement},
		{"simulated root when only HYGON's is trusted", realOnly, func(n []byte) *attestpb.Evidence { return gather(n, good) }, verifier.StatusContraindicated, "workload-" + csv.ReasonUntrustedRoot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, _, err := tc.v.Challenge(ctx)
			if err != nil {
				t.Fatal(err)
			}
			res, err := tc.v.Verify(ctx, n, tc.evidence(n))
			if err != nil {
				t.Fatal(err)
			}
			w, ok := res.Submods["csv-workload"]
			if !ok || w.Status != tc.status || !slices.Contains(w.Reasons, tc.reason) {
				t.Fatalf("csv-workload = %+v (present %v), want %s with %q\nfacts: %+v", w, ok, tc.status, tc.reason, res.Facts.Workload)
			}
			// The other legs are judged on their own.
			if res.Submods["cvtpm-vtpm"].Status != verifier.StatusAffirming {
				t.Fatalf("cvtpm-vtpm = %+v", res.Submods["cvtpm-vtpm"])
			}
		})
	}
	// Without a workload report and not required: two legs, as before.
	two := newVerifier(simPolicy, false)
	n, _, _ := two.Challenge(ctx)
	res, err := two.Verify(ctx, n, gather(n, nil))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := res.Submods["csv-workload"]; ok || len(res.Submods) != 2 {
		t.Fatalf("no workload report, not required: %+v", res.Submods)
	}
}

// `cvtpm verifier reference` turns a known-good boot's event log into
// reference values: they equal the PCRs the verified quote shows, and the
// verifier affirms with them; a log of another boot gives values it
// refuses.
func TestReferenceFromEventLog(t *testing.T) {
	e := startAttestEnv(t, "vm1")
	dir := t.TempDir()
	logFile, refFile := filepath.Join(dir, "events.log"), filepath.Join(dir, "ref.json")
	os.WriteFile(logFile, e.logs["vm1"].bytes(), 0o600)
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "verifier", "reference", "--event-log", logFile, "--pcrs", "16", "--out", refFile)
	b, _ := os.ReadFile(refFile)
	ref, err := verifier.ParseReference(b)
	if err != nil {
		t.Fatalf("the derived reference does not parse: %v\n%s", err, b)
	}
	v, _ := e.verifierWith(t, nil, ref)
	ctx := context.Background()
	n, _, _ := v.Challenge(ctx)
	res, err := v.Verify(ctx, n, e.gather(t, "vm1", n))
	if err != nil {
		t.Fatal(err)
	}
	if s := res.Submods["cvtpm-vtpm"]; s.Status != verifier.StatusAffirming {
		t.Fatalf("with the reference from the log: %+v\n%s", s, b)
	}
	if want := res.Facts.TPM.PCRs["16"]; !strings.Contains(string(b), want) {
		t.Fatalf("reference %s lacks the quoted PCR 16 %s", b, want)
	}
	// Another boot: one more component measured into PCR 16.
	scratch := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{})
	stpm, err := tpmsock.Dial(ctx, "unix", scratch.DataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer stpm.Close()
	other := guestkit.NewEventLog()
	for _, c := range []string{"cvtpm test loader vm1", "cvtpm test kernel", "an extra driver"} {
		if err := other.Measure(stpm, 16, guestkit.EventIPL, []byte(c)); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(logFile, other.Bytes(), 0o600)
	testenv.Run(t, nil, testenv.Binary(t, testenv.Cvtpm), "verifier", "reference", "--event-log", logFile, "--pcrs", "16", "--out", refFile)
	b, _ = os.ReadFile(refFile)
	ref, _ = verifier.ParseReference(b)
	v, _ = e.verifierWith(t, nil, ref)
	n, _, _ = v.Challenge(ctx)
	if res, err = v.Verify(ctx, n, e.gather(t, "vm1", n)); err != nil {
		t.Fatal(err)
	}
	if s := res.Submods["cvtpm-vtpm"]; s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, "pcr-16-not-reference") {
		t.Fatalf("with another boot's reference: %+v", s)
	}
	// Bad input is refused by name.
	os.WriteFile(logFile, []byte("not an event log"), 0o600)
	if out, err := testenv.RunErr(nil, testenv.Binary(t, testenv.Cvtpm), "verifier", "reference", "--event-log", logFile); err == nil || !strings.Contains(out, "event log") {
		t.Fatalf("garbage log: %v %s", err, out)
	}
}

// startVerifierReplicas starts n `cvtpm verifier` processes keeping their
// challenges in one PostgreSQL (started here) and returns a client of each.
func startVerifierReplicas(tb testing.TB, e *attestEnv, n int) []attestpb.VerifierClient {
	tb.Helper()
	pg := testenv.StartPostgres(tb)
	var clients []attestpb.VerifierClient
	for i := range n {
		addr := fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb))
		testenv.StartDaemon(tb, "verifier", []string{"tcp:" + addr}, "verifier", "--postgres", pg,
			"--ek-root", e.ca.RootFile(ca.PurposeEK), "--ak-root", e.ca.RootFile(ca.PurposeAK),
			"--crl", e.ca.CRLURL(ca.PurposeEK), "--crl", e.ca.CRLURL(ca.PurposeAK), "--policy", e.files.Policy,
			"--cert-dir", e.files.CertDir, "--token-key", filepath.Join(e.files.Dir, fmt.Sprintf("v%d.key", i)), "--listen", addr, "--http", "")
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { conn.Close() })
		clients = append(clients, attestpb.NewVerifierClient(conn))
	}
	return clients
}

// Two verifier processes behind a load balancer share their challenges in
// PostgreSQL: a nonce handed out by one is accepted by the other, once.
func TestVerifierReplicasShareNonces(t *testing.T) {
	e := startAttestEnv(t, "vm1")
	replicas := startVerifierReplicas(t, e, 2)
	a, b := replicas[0], replicas[1]
	ctx := context.Background()
	ch, err := a.Challenge(ctx, &attestpb.ChallengeRequest{})
	if err != nil {
		t.Fatal(err)
	}
	ev := e.gather(t, "vm1", ch.Nonce)
	verdict := func(c attestpb.VerifierClient) ear.Submod {
		resp, err := c.Attest(ctx, &attestpb.AttestRequest{Nonce: ch.Nonce, Evidence: ev})
		if err != nil {
			t.Fatal(err)
		}
		tok, err := ear.ReadUnverified(resp.Ear)
		if err != nil {
			t.Fatal(err)
		}
		return tok.Submods["cvtpm-vtpm"]
	}
	if s := verdict(b); s.Status != verifier.StatusAffirming {
		t.Fatalf("the other replica with the first one's nonce: %+v", s)
	}
	if s := verdict(a); s.Status != verifier.StatusContraindicated || !slices.Contains(s.Reasons, "nonce-unknown-or-used") {
		t.Fatalf("the nonce used again at the first replica: %+v", s)
	}
}
