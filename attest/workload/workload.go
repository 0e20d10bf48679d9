// Package workload defines the workload leg of cvtpm's evidence: the
// confidential workload VM's own CSV report, next to its vTPM's quote and
// the fresh report of the backend hosting that vTPM, so that one verdict
// covers all three (as Azure's CVMs bind the vTPM's AK into the SEV-SNP
// report).
//
// The guest asks its CSV firmware (/dev/csv-guest) for a report whose
// report_data is ReportData(nonce, AK): the verifier's nonce, and the
// public area of the AK that signs the quote. The report thereby says that
// software inside this workload VM, measured at launch, created that AK
// for this verification: a report replayed from another session (another
// nonce) or made for another AK (another VM's TPM) does not match.
package workload

import (
	"crypto/sha512"
	"encoding/binary"
)

const label = "cvtpm workload attest v1"

// ReportData is the workload report's report_data: SHA-512 over
// "cvtpm workload attest v1" and the u32-length-prefixed nonce and AK public area
// (TPMT_PUBLIC). It is the one definition; the attester and the verifier
// both call it. The label differs from enrollment's, the fresh report's
// and the attested link's workload proof ("cvtpm workload v1"), so no
// report serves two purposes.
func ReportData(nonce, akPublicArea []byte) [64]byte {
	h := sha512.New()
	h.Write([]byte(label))
	for _, f := range [][]byte{nonce, akPublicArea} {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(f))))
		h.Write(f)
	}
	var out [64]byte
	h.Sum(out[:0])
	return out
}
