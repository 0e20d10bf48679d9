package enroll

import (
	"crypto/sha512"
	"encoding/binary"
)

// bindingLabel separates enrollment report_data from every other use of a
// CSV report (the attested link, fresh attestation reports).
const bindingLabel = "cvtpm enroll v1"

// ReportData is the 64-byte report_data a backend puts in the CSV report it
// sends with an enrollment: SHA-512 over the label and the length-prefixed
// (u32 big-endian) CA nonce, EK public area (TPMT_PUBLIC as the TPM returns
// it) and instance id. Changing any of them changes the digest, so the CA
// refuses a report made for another nonce, EK or instance.
func ReportData(nonce, ekPublicArea []byte, instanceID string) [64]byte {
	h := sha512.New()
	h.Write([]byte(bindingLabel))
	for _, field := range [][]byte{nonce, ekPublicArea, []byte(instanceID)} {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(field))))
		h.Write(field)
	}
	var out [64]byte
	h.Sum(out[:0])
	return out
}
