package main

// Review 3: the guest's check that a signed verdict answers this run
// (answersThis) compares the nonce, the EK serial and the issue time, but
// nothing that ties the verdict to the evidence the guest sent. A relay
// between guest and verifier (plaintext gRPC, the host's network) can send
// other evidence for the guest's nonce and EK: the verifier signs a verdict
// about that evidence, with the guest's nonce, and the guest prints it as
// its own.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"math/big"
	"strings"
	"testing"
	"time"

	tpmtoolspb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/ear"
)

// review3Run is a guest's run: its nonce, its evidence (EK certificate,
// a SHA-256 quote with PCR 16 = pcr16, optionally a workload report) and
// a token that the verifier signs about other evidence for the same
// nonce and EK.
func review3Run(t *testing.T, pcr16 []byte, workload bool) ([]byte, *attestpb.Evidence, string, time.Time) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(0x0abc), Subject: pkix.Name{CommonName: "ek"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	ekCert, _ := x509.ParseCertificate(der)
	att, _ := proto.Marshal(&tpmtoolspb.Attestation{Quotes: []*tpmpb.Quote{{
		Pcrs: &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{16: pcr16}}}}})
	ev := &attestpb.Evidence{EkChain: [][]byte{der}, TpmAttestation: att, InstanceId: "vm1"}
	if workload {
		ev.WorkloadReport = []byte("the workload VM's CSV report (e.g. launched with the debug policy bit)")
	}
	nonce := make([]byte, 32)
	rand.Read(nonce)
	return nonce, ev, ekCert.SerialNumber.Text(16), time.Now()
}

func review3Token(nonce []byte, ekSerial string, pcrs map[string]string) *ear.EAR {
	return &ear.EAR{Profile: ear.Profile, IssuedAt: time.Now().Unix(), Nonce: base64.RawURLEncoding.EncodeToString(nonce),
		Submods: map[string]ear.Submod{
			"cvtpm-vtpm":   {Status: ear.StatusAffirming, Evidence: map[string]any{"ek_serial": ekSerial, "pcrs_sha256": pcrs}},
			"csv-platform": {Status: ear.StatusAffirming, Evidence: map[string]any{"instance": "vm1"}},
		}}
}

// The guest sent its workload VM's report (--workload-evidence); the relay
// drops it before the verifier (which does not --require-workload), so the
// verdict has no csv-workload leg. The guest prints "not sent and not
// required" and exits 0, although the verifier would have refused the
// report it did send.
func TestReview3GuestAcceptsVerdictWithoutItsWorkloadLeg(t *testing.T) {
	pcr := make([]byte, 32)
	nonce, ev, serial, started := review3Run(t, pcr, true)
	tok := review3Token(nonce, serial, map[string]string{"16": hex.EncodeToString(pcr)})
	if !tok.Passes() {
		t.Fatal("test token does not pass")
	}
	// What the verifier received and signed a verdict about.
	relayed := proto.Clone(ev).(*attestpb.Evidence)
	relayed.WorkloadReport = nil
	tok.EvidenceDigest = ear.EvidenceDigest(relayed)
	if err := answersThis(tok, nonce, ev, started); err == nil {
		t.Fatal("answersThis accepted a verdict without the workload leg the guest sent: a relay that strips the " +
			"workload report gets AFFIRMING and exit 0 for evidence the verifier would refuse")
	}
}

// The relay sends, for the guest's nonce, evidence of the same vTPM made
// by the host through the frontend (its own AK, quoted before the guest
// measured something the reference refuses, or with an event log of its
// choosing): the verdict's PCRs are not the ones the guest quoted, and
// the guest takes it as its own.
func TestReview3GuestAcceptsVerdictAboutOtherPCRs(t *testing.T) {
	bad := make([]byte, 32)
	bad[0] = 0xba
	nonce, ev, serial, started := review3Run(t, bad, false)
	good := strings.Repeat("00", 32)
	tok := review3Token(nonce, serial, map[string]string{"16": good})
	relayed := proto.Clone(ev).(*attestpb.Evidence)
	relayed.TpmAttestation, _ = proto.Marshal(&tpmtoolspb.Attestation{Quotes: []*tpmpb.Quote{{
		Pcrs: &tpmpb.PCRs{Hash: tpmpb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{16: make([]byte, 32)}}}}})
	tok.EvidenceDigest = ear.EvidenceDigest(relayed)
	if err := answersThis(tok, nonce, ev, started); err == nil {
		t.Fatalf("answersThis accepted a verdict about PCR 16 = %s while this TPM quoted %x: the verdict is about another "+
			"evidence than the guest's", good, bad)
	}
}

// The verdict about the evidence this run sent, for its nonce, now: taken.
// Another nonce, an old token or another EK: refused.
func TestAnswersThis(t *testing.T) {
	pcr := make([]byte, 32)
	nonce, ev, serial, started := review3Run(t, pcr, true)
	ok := func() *ear.EAR {
		tok := review3Token(nonce, serial, map[string]string{"16": hex.EncodeToString(pcr)})
		tok.EvidenceDigest = ear.EvidenceDigest(ev)
		return tok
	}
	if err := answersThis(ok(), nonce, ev, started); err != nil {
		t.Fatalf("the verdict about this run's own evidence: %v", err)
	}
	for name, change := range map[string]func(*ear.EAR){
		"another nonce":   func(e *ear.EAR) { e.Nonce = base64.RawURLEncoding.EncodeToString(make([]byte, 32)) },
		"issued long ago": func(e *ear.EAR) { e.IssuedAt = started.Add(-time.Hour).Unix() },
		"another EK":      func(e *ear.EAR) { e.Submods["cvtpm-vtpm"].Evidence["ek_serial"] = "1234" },
		"no digest":       func(e *ear.EAR) { e.EvidenceDigest = "" },
	} {
		tok := ok()
		change(tok)
		if err := answersThis(tok, nonce, ev, started); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
