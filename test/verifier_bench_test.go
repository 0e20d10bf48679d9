package test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	tpmtoolspb "github.com/google/go-tpm-tools/proto/attest"
	"github.com/google/go-tpm-tools/server"
	"google.golang.org/protobuf/proto"

	"cvtpm/attest/csv"
	"cvtpm/attest/verifier"
	"cvtpm/ca"
)

// anyNonce accepts every nonce, so one piece of evidence can be verified
// over and over in a benchmark.
type anyNonce struct{}

func (anyNonce) Issue(context.Context, []byte, time.Time) error { return nil }
func (anyNonce) Consume(context.Context, []byte, time.Time) (bool, string) {
	return true, ""
}

// BenchmarkAttestationVerify: full combined verifications per second (ECC
// AK; EK/AK chains, go-tpm-tools quote + event log, CSV report, Rego, EAR
// signing) beside go-tpm-tools' TPM-only VerifyAttestation of the same
// evidence, both on all CPUs and both from the serialized evidence. The CRL
// comes from the CA's HTTP endpoint through a CachedCRL, as a deployment
// would use it.
func BenchmarkAttestationVerify(b *testing.B) {
	e := startAttestEnv(b, "vm1")
	nonce := []byte("benchmark nonce 0123456789abcdef")
	ev := e.gather(b, "vm1", nonce)
	policy := &csv.AppraisalPolicy{SimulatorRoots: []string{filepath.Join(e.files.SimDir, csv.SimRootFile)},
		ApprovedMeasurements: []string{hex.EncodeToString(e.files.Measure[:])}}
	if err := policy.Compile(); err != nil {
		b.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	v, err := verifier.New(context.Background(), verifier.Options{EKRoots: [][]byte{e.caRoot.Raw}, AKRoots: [][]byte{e.akRoot.Raw}, CSV: policy, Signer: key, Nonces: anyNonce{},
		CRLs: []verifier.CRLSource{&verifier.CachedCRL{Source: verifier.HTTPCRL{URL: e.ca.CRLURL(ca.PurposeEK)}}, &verifier.CachedCRL{Source: verifier.HTTPCRL{URL: e.ca.CRLURL(ca.PurposeAK)}}}})
	if err != nil {
		b.Fatal(err)
	}
	res, err := v.Verify(context.Background(), nonce, ev)
	if err != nil || !res.Affirming() {
		b.Fatalf("evidence not affirming: %v %+v", err, res)
	}
	rate := func(f func() error) float64 {
		const n = 2000
		start := time.Now()
		errs := make(chan error, n)
		sem := make(chan struct{}, 2*4)
		for range n {
			sem <- struct{}{}
			go func() { errs <- f(); <-sem }()
		}
		for range n {
			if err := <-errs; err != nil {
				b.Fatal(err)
			}
		}
		return n / time.Since(start).Seconds()
	}
	var full, tpmOnly []float64
	for range 3 { // alternate, the machine's speed drifts
		full = append(full, rate(func() error { _, err := v.Verify(context.Background(), nonce, ev); return err }))
		tpmOnly = append(tpmOnly, rate(func() error {
			att := &tpmtoolspb.Attestation{}
			if err := proto.Unmarshal(ev.TpmAttestation, att); err != nil {
				return err
			}
			_, err := server.VerifyAttestation(att, server.VerifyOpts{Nonce: nonce, TrustedRootCerts: []*x509.Certificate{e.akRoot}})
			return err
		}))
	}
	for range b.N {
	}
	f, o := medianFloat64(full), medianFloat64(tpmOnly)
	b.ReportMetric(f, "full-verifications/s")
	b.ReportMetric(o, "tpm-only/s")
	b.ReportMetric(o/f, "cost-ratio")
	fmt.Printf("combined verification (TPM + CSV, ECC AK): %.0f/s; go-tpm-tools TPM-only VerifyAttestation: %.0f/s; cost ratio %.2fx\n", f, o, o/f)
}

func medianFloat64(v []float64) float64 {
	s := append([]float64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
