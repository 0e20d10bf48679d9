package backend

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
)

// Review 11: a workload binding is a full csv.AppraisalPolicy, chip
// allow/deny lists included, but the backend checks the workload's report
// with the HSK+CEK the (host-relayed) client sends. The chip serial in a
// CSV report is only MACed with a key the report carries, so a workload
// on a denied chip rewrites its serial to an allowed one and passes. The
// CA, the link clients and the verifier refuse chip lists in that mode
// (csv.ErrEvidenceCertsWithChipLists); the binding neither refuses them
// nor looks HSK+CEK up by serial.
func TestReview11WorkloadBindingChipListForgedSerial(t *testing.T) {
	sim, root := workloadSim(t, 0x11, 0x7) // chip SIMWORK01
	b, _ := json.Marshal(map[string]any{"host": "boot", "workload": map[string]any{
		"simulator_roots":       []string{root},
		"approved_measurements": []string{strings.Repeat("11", 32)},
		"deny_chips":            []string{"SIMWORK01"},
	}})
	bd, err := ParseBinding(b)
	if err != nil {
		// Refusing chip lists in a binding would be one fix.
		t.Skipf("binding with chip lists refused: %v", err)
	}
	var rd [64]byte
	copy(rd[:], "session exporter and backend nonce")
	report, err := sim.Report(context.Background(), rd[:])
	if err != nil {
		t.Fatal(err)
	}
	// The genuine report of the denied chip is refused.
	genuine := &attestedlink.WorkloadEvidence{Report: report, HSKCEK: csv.MarshalHSKCEK(sim.HSK, sim.CEK), ReportData: rd}
	if err := bd.checkWorkload(context.Background(), genuine); err == nil || !strings.Contains(err.Error(), csv.ReasonChip) {
		t.Fatalf("denied chip's genuine report: %v", err)
	}
	// The same report with the serial rewritten (MAC recomputed).
	r, err := csv.ParseReport(report)
	if err != nil {
		t.Fatal(err)
	}
	r.SN = [64]byte{}
	copy(r.SN[:], "SIMOTHER02")
	r.MAC = r.ComputeMAC()
	forged := &attestedlink.WorkloadEvidence{Report: r.Marshal(), HSKCEK: genuine.HSKCEK, ReportData: rd}
	if err := bd.checkWorkload(context.Background(), forged); err == nil {
		t.Fatal("a workload on a denied chip passed the binding's deny list by rewriting its (unsigned) chip serial")
	}
}

type staticCRL struct{ crl *x509.RevocationList }

func (s *staticCRL) CRL(context.Context) (*x509.RevocationList, error) { return s.crl, nil }

func parseCRL(t *testing.T, der []byte) *x509.RevocationList {
	t.Helper()
	c, err := x509.ParseRevocationList(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Review 11: --client-ca may hold several CAs ("the CA(s)"; e.g.
// identity-ca.pem and, for identities issued before the split, ca.pem),
// and --client-crl is one URL fetched over the host's network. The
// backend accepts any CRL signed by any --client-ca certificate as the
// CRL of every client certificate: it never matches the CRL's issuer to
// the certificate's. The host serves the EK root's CRL (/crl, signed by
// ca.pem) in place of /crl/identity, and a revoked link identity is
// accepted again.
func TestReview11ClientRevocationOtherIssuersCRL(t *testing.T) {
	identityCA, ekCA := newTestCA(t, "cvtpm link identity CA"), newTestCA(t, "cvtpm EK CA")
	frontend := identityCA.issue(t, "frontend", 42)
	identityCRL := parseCRL(t, identityCA.crl(t, time.Now().Add(time.Hour), 42)) // frontend revoked
	ekCRL := parseCRL(t, ekCA.crl(t, time.Now().Add(time.Hour)))                 // lists nothing of the identity CA
	src := &staticCRL{identityCRL}
	r := &ClientRevocation{CRL: src, Issuers: []*x509.Certificate{identityCA.cert, ekCA.cert}}
	if err := r.Check(context.Background(), frontend); err == nil {
		t.Fatal("the revoked identity passed with its issuer's CRL")
	}
	src.crl = ekCRL // the relay swaps the CRL
	if err := r.Check(context.Background(), frontend); err == nil {
		t.Fatal("a revoked link identity is accepted when the relay serves another --client-ca issuer's CRL in place of its issuer's")
	}
}

// Review 11: the CRL comes over the host's network and is signed for a day
// (the CA's NextUpdate); neither pkisig.CachedCRL nor ClientRevocation
// refuses a CRL older than one already seen (lower CRL number, earlier
// thisUpdate). After the CA revokes an identity and the backend has seen
// that CRL, the relay serves the CRL from before the revocation again and
// the revoked identity is back until that old CRL's NextUpdate: the
// documented "a revocation takes effect within --client-crl-refresh"
// does not hold against the host.
func TestReview11ClientRevocationCRLRollback(t *testing.T) {
	identityCA := newTestCA(t, "cvtpm link identity CA")
	frontend := identityCA.issue(t, "frontend", 42)
	before := parseCRL(t, identityCA.crl(t, time.Now().Add(time.Hour)))
	time.Sleep(time.Millisecond) // a higher CRL number (UnixNano)
	after := parseCRL(t, identityCA.crl(t, time.Now().Add(time.Hour), 42))
	src := &staticCRL{after}
	r := &ClientRevocation{CRL: src, Issuers: []*x509.Certificate{identityCA.cert}}
	if err := r.Check(context.Background(), frontend); err == nil {
		t.Fatal("the revoked identity passed")
	}
	src.crl = before // replayed by the relay
	if err := r.Check(context.Background(), frontend); err == nil {
		t.Fatalf("a revoked link identity is accepted again when the relay replays an older CRL (number %v < %v already seen)", before.Number, after.Number)
	}
}
