package workload_test

import (
	"bytes"
	"testing"

	"cvtpm/attest/workload"
	"cvtpm/internal/attestedlink"
)

// Review 14, finding 3: the package promises that its label differs from
// the attested link's, "so no report serves two purposes", but the
// attested link's workload proof uses the very same label and encoding:
// SHA-512("cvtpm workload v1" || len||a || len||b). A workload VM's report
// for a link session (a = TLS exporter, b = backend nonce) is therefore a
// verifier workload report for nonce a and AK public area b, and the other
// way round; only today's field lengths (64-byte exporter, 32-byte nonces)
// keep the two apart.
func TestReview14WorkloadLabelSharedWithAttestedLink(t *testing.T) {
	a, b := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 90)
	verifierRD := workload.ReportData(a, b)
	linkRD := attestedlink.WorkloadReportData(a, b)
	if verifierRD == linkRD {
		t.Fatalf("workload.ReportData and attestedlink.WorkloadReportData are one function (report_data %x): no domain separation between the verifier's workload leg and the attested link's workload proof", verifierRD[:8])
	}
}
