// Package freshreport defines how a relying party obtains a fresh CSV
// report from the backend that hosts a vTPM instance, through the TPM
// itself: a vendor-specific TPM command that any TPM client can send (QEMU
// -> frontend -> backend, or guestkit's attested link). The backend answers
// it instead of passing it to libtpms. The report's report_data commits to
// the caller's nonce, the instance's EK public area and the instance id
// (ReportData), so a verifier can require that the TPM quote and the CSV
// report answer the same nonce and concern the same EK.
//
// Command (TPM 2.0 framing, all integers big-endian):
//
//	tag u16 = 0x8001 (TPM_ST_NO_SESSIONS) | size u32 | commandCode u32 = 0x20000101
//	nonce TPM2B (u16 size, at most 64 bytes) | ekHandle u32 (a persistent EK) | part u8
//
// part 0 asks for the report, part 1 for the chip's HSK||CEK (too large to
// share a TPM response buffer of 4 KiB with a report). Response:
//
//	tag u16 = 0x8001 | size u32 | responseCode u32 = 0
//	instance TPM2B | ekPublic TPM2B (TPMT_PUBLIC) | payload TPM2B (report or HSK||CEK)
//
// A non-zero responseCode is a TPM error as usual: TPM_RC_VALUE (0x84) for
// a bad nonce or part, TPM_RC_HANDLE-class codes from reading the EK, and
// TPM_RC_FAILURE (0x101) when the backend cannot produce evidence.
package freshreport

import (
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
)

// CommandCode is TPM_CC_V (the vendor-specific bit, 1<<29) | 0x0101.
const CommandCode = 0x20000101

// Part selects what the command returns.
type Part uint8

const (
	PartReport    Part = 0
	PartChipCerts Part = 1
)

// MaxNonce bounds the caller's nonce.
const MaxNonce = 64

const label = "cvtpm attest v1"

// ReportData is the report_data of a fresh attestation report: SHA-512 over
// "cvtpm attest v1" and the u32-length-prefixed nonce, EK public area
// (TPMT_PUBLIC) and instance id. It is the one definition; the backend and
// every verifier call it. The label differs from enrollment's and the
// attested link's, so no report can be reused across those purposes.
func ReportData(nonce, ekPublicArea []byte, instance string) [64]byte {
	h := sha512.New()
	h.Write([]byte(label))
	for _, f := range [][]byte{nonce, ekPublicArea, []byte(instance)} {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(f))))
		h.Write(f)
	}
	var out [64]byte
	h.Sum(out[:0])
	return out
}

// Request is a parsed command.
type Request struct {
	Nonce    []byte
	EKHandle uint32
	Part     Part
}

// ErrMalformed wraps every parsing error.
var ErrMalformed = errors.New("malformed CSV report command")

// Command encodes a request.
func Command(r Request) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 0}
	b = binary.BigEndian.AppendUint32(b, CommandCode)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.Nonce)))
	b = append(b, r.Nonce...)
	b = binary.BigEndian.AppendUint32(b, r.EKHandle)
	b = append(b, byte(r.Part))
	binary.BigEndian.PutUint32(b[2:6], uint32(len(b)))
	return b
}

// IsCommand reports whether cmd carries this command's code.
func IsCommand(cmd []byte) bool {
	return len(cmd) >= 10 && binary.BigEndian.Uint32(cmd[6:10]) == CommandCode
}

// ParseCommand decodes a command.
func ParseCommand(cmd []byte) (Request, error) {
	if len(cmd) < 10 || !IsCommand(cmd) {
		return Request{}, fmt.Errorf("%w: not a CSV report command", ErrMalformed)
	}
	if tag := binary.BigEndian.Uint16(cmd); tag != 0x8001 {
		return Request{}, fmt.Errorf("%w: tag %#x, want 0x8001", ErrMalformed, tag)
	}
	if n := binary.BigEndian.Uint32(cmd[2:6]); int(n) != len(cmd) {
		return Request{}, fmt.Errorf("%w: size field %d, command is %d bytes", ErrMalformed, n, len(cmd))
	}
	p := cmd[10:]
	if len(p) < 2 {
		return Request{}, fmt.Errorf("%w: no nonce", ErrMalformed)
	}
	n := int(binary.BigEndian.Uint16(p))
	if n > MaxNonce {
		return Request{}, fmt.Errorf("%w: nonce of %d bytes (at most %d)", ErrMalformed, n, MaxNonce)
	}
	if len(p) != 2+n+4+1 {
		return Request{}, fmt.Errorf("%w: parameters are %d bytes, want %d", ErrMalformed, len(p), 2+n+5)
	}
	r := Request{Nonce: p[2 : 2+n], EKHandle: binary.BigEndian.Uint32(p[2+n:]), Part: Part(p[6+n])}
	if r.Part > PartChipCerts {
		return Request{}, fmt.Errorf("%w: part %d", ErrMalformed, r.Part)
	}
	return r, nil
}

// Result is a parsed successful response.
type Result struct {
	Instance string
	EKPublic []byte // TPMT_PUBLIC
	Payload  []byte // the report, or HSK||CEK
}

// AppendResponse appends a successful response to dst.
func AppendResponse(dst []byte, r Result) []byte {
	start := len(dst)
	dst = append(dst, 0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0)
	for _, f := range [][]byte{[]byte(r.Instance), r.EKPublic, r.Payload} {
		dst = binary.BigEndian.AppendUint16(dst, uint16(len(f)))
		dst = append(dst, f...)
	}
	binary.BigEndian.PutUint32(dst[start+2:], uint32(len(dst)-start))
	return dst
}

// ResponseError is a TPM error answer to the command.
type ResponseError struct{ RC uint32 }

// RCResourceManagerCommandCode is what the Linux kernel's resource
// manager (/dev/tpmrmN) answers for a command code it does not find in
// the TPM's command list: TSS2_RESMGR_TPM_RC_LAYER | TPM_RC_COMMAND_CODE.
// Kernels before 6.3 give it for every vendor command, listed or not
// (they compare only the low 16 bits of the code); /dev/tpmN passes it.
const RCResourceManagerCommandCode = 0x000b0143

func (e *ResponseError) Error() string {
	if e.RC == RCResourceManagerCommandCode {
		return "CSV report command refused by the kernel's TPM resource manager (/dev/tpmrmN passes no vendor command before Linux 6.3): use the raw device, /dev/tpmN"
	}
	return fmt.Sprintf("CSV report command failed: TPM response code %#x", e.RC)
}

// ParseResponse decodes a response.
func ParseResponse(resp []byte) (Result, error) {
	if len(resp) < 10 {
		return Result{}, fmt.Errorf("%w: response of %d bytes", ErrMalformed, len(resp))
	}
	if n := binary.BigEndian.Uint32(resp[2:6]); int(n) != len(resp) {
		return Result{}, fmt.Errorf("%w: response size field %d, response is %d bytes", ErrMalformed, n, len(resp))
	}
	if rc := binary.BigEndian.Uint32(resp[6:10]); rc != 0 {
		return Result{}, &ResponseError{RC: rc}
	}
	if tag := binary.BigEndian.Uint16(resp); tag != 0x8001 {
		return Result{}, fmt.Errorf("%w: response tag %#x, want 0x8001", ErrMalformed, tag)
	}
	p := resp[10:]
	var fields [3][]byte
	for i := range fields {
		if len(p) < 2 {
			return Result{}, fmt.Errorf("%w: response field %d missing", ErrMalformed, i)
		}
		n := int(binary.BigEndian.Uint16(p))
		if len(p) < 2+n {
			return Result{}, fmt.Errorf("%w: response field %d truncated", ErrMalformed, i)
		}
		fields[i], p = p[2:2+n], p[2+n:]
	}
	if len(p) != 0 {
		return Result{}, fmt.Errorf("%w: %d trailing bytes", ErrMalformed, len(p))
	}
	return Result{Instance: string(fields[0]), EKPublic: fields[1], Payload: fields[2]}, nil
}

// Transport is what Get needs of a TPM (go-tpm's transport.TPM).
type Transport interface {
	Send(cmd []byte) ([]byte, error)
}

// Get asks the TPM's backend for a fresh report bound to nonce and the EK
// at ekHandle, and for the chip certificates; the caller verifies both.
func Get(tpm Transport, nonce []byte, ekHandle uint32) (report, hskCEK []byte, res Result, err error) {
	for _, part := range []Part{PartReport, PartChipCerts} {
		resp, err := tpm.Send(Command(Request{Nonce: nonce, EKHandle: ekHandle, Part: part}))
		if err != nil {
			return nil, nil, Result{}, err
		}
		r, err := ParseResponse(resp)
		if err != nil {
			return nil, nil, Result{}, err
		}
		if part == PartReport {
			report, res = r.Payload, r
		} else {
			hskCEK = r.Payload
		}
	}
	return report, hskCEK, res, nil
}
