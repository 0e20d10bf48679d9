package guestkit

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// EventLog is a TCG PC Client crypto-agile event log (SHA-256 bank) that
// grows as Measure extends PCRs, the way firmware and bootloaders keep
// /sys/kernel/security/tpm0/binary_bios_measurements. It lets software in
// the guest measure what it loads and prove it with a quote plus the log.
type EventLog struct{ buf bytes.Buffer }

// Event types used by Measure.
const (
	EventIPL       = 0x0d // EV_IPL
	eventNoAction  = 0x03
	algSHA256      = 0x000b
	sha256Size     = 32
	specIDSigLen   = 16
	specIDOverhead = 4 + 4 + 20 + 4
)

// NewEventLog starts a log with its Spec ID header event.
func NewEventLog() *EventLog {
	l := &EventLog{}
	var spec bytes.Buffer
	spec.WriteString("Spec ID Event03\x00")
	binary.Write(&spec, binary.LittleEndian, uint32(0)) // platform class
	spec.Write([]byte{0, 2, 0, 2})                      // spec 2.0, errata 0, UINTN of 64 bits
	binary.Write(&spec, binary.LittleEndian, uint32(1)) // one algorithm:
	binary.Write(&spec, binary.LittleEndian, uint16(algSHA256))
	binary.Write(&spec, binary.LittleEndian, uint16(sha256Size))
	spec.WriteByte(0) // no vendor data
	binary.Write(&l.buf, binary.LittleEndian, uint32(0))
	binary.Write(&l.buf, binary.LittleEndian, uint32(eventNoAction))
	l.buf.Write(make([]byte, 20))
	binary.Write(&l.buf, binary.LittleEndian, uint32(spec.Len()))
	l.buf.Write(spec.Bytes())
	return l
}

// ContinueEventLog continues a log written by NewEventLog and Measure.
func ContinueEventLog(b []byte) (*EventLog, error) {
	if len(b) < specIDOverhead+specIDSigLen || !bytes.Equal(b[specIDOverhead:specIDOverhead+specIDSigLen], []byte("Spec ID Event03\x00")) {
		return nil, fmt.Errorf("not a crypto-agile TCG event log (no Spec ID Event03 header)")
	}
	l := &EventLog{}
	l.buf.Write(b)
	return l, nil
}

// Measure extends pcr with SHA-256(data) and records the event.
func (l *EventLog) Measure(tpm transport.TPM, pcr uint32, eventType uint32, data []byte) error {
	d := sha256.Sum256(data)
	if _, err := (tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}}}).Execute(tpm); err != nil {
		return fmt.Errorf("PCR_Extend(%d): %w", pcr, err)
	}
	binary.Write(&l.buf, binary.LittleEndian, pcr)
	binary.Write(&l.buf, binary.LittleEndian, eventType)
	binary.Write(&l.buf, binary.LittleEndian, uint32(1))
	binary.Write(&l.buf, binary.LittleEndian, uint16(algSHA256))
	l.buf.Write(d[:])
	binary.Write(&l.buf, binary.LittleEndian, uint32(len(data)))
	l.buf.Write(data)
	return nil
}

// Bytes is the log in its binary form.
func (l *EventLog) Bytes() []byte { return bytes.Clone(l.buf.Bytes()) }
