package attestedlink

import (
	"bufio"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Protocol constants.
const (
	Version        = 1
	ExporterLabel  = "EXPORTER-cvtpm-attested-link"
	reportDataTag  = "cvtpm attested link v1"
	NonceSize      = 32
	exporterSize   = 64
	maxFrame       = 2 << 20
	maxInstanceLen = 255
	frameHeader    = 4 + 1 + 1 + 8 + 2
)

// Frame types.
const (
	frameHello    = 1 // client -> server: nonce
	frameEvidence = 2 // server -> client: report and HSK/CEK
	frameRequest  = 3 // client -> server: tpmrpc request for an instance
	frameResponse = 4 // server -> client: tpmrpc response
	frameError    = 5 // either way: the session ends; payload says why
	frameWorkload = 6 // client -> server, optional, before any request: the workload's own CSV report and HSK/CEK
)

const workloadTag = "cvtpm workload v1"

// WorkloadReportData is what a workload's own CSV report must carry to
// prove the workload VM is this session's client:
// SHA-512("cvtpm workload v1" || len || exporter || len || backend nonce),
// the backend nonce coming with the backend's evidence.
func WorkloadReportData(exporter, backendNonce []byte) [64]byte {
	return taggedDigest(workloadTag, exporter, backendNonce)
}

// ReportData is what the backend's CSV report must carry for a session:
// SHA-512(tag || len || exporter || len || nonce), lengths u32 big-endian.
// It is the one definition; client and server both call it.
func ReportData(exporter, nonce []byte) [64]byte {
	return taggedDigest(reportDataTag, exporter, nonce)
}

// taggedDigest is SHA-512(tag || len || part || ...), lengths u32
// big-endian.
func taggedDigest(tag string, parts ...[]byte) [64]byte {
	h := sha512.New()
	h.Write([]byte(tag))
	for _, b := range parts {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	var out [64]byte
	h.Sum(out[:0])
	return out
}

// ErrProtocol wraps every violation of the framing rules.
var ErrProtocol = errors.New("attested link protocol violation")

type frame struct {
	typ      byte
	seq      uint64
	instance string
	payload  []byte // aliases the reader's buffer
}

// framer reads and writes frames with per-direction sequence numbers.
type framer struct {
	r       *bufio.Reader
	w       io.Writer
	sendSeq uint64
	recvSeq uint64
	in, out []byte
}

func newFramer(rw io.ReadWriter) *framer {
	return &framer{r: bufio.NewReaderSize(rw, 32<<10), w: rw}
}

// write sends one frame in one Write call (one TLS record for small ones).
func (f *framer) write(typ byte, instance string, payload ...[]byte) error {
	if len(instance) > maxInstanceLen {
		return fmt.Errorf("instance id is %d bytes, more than %d", len(instance), maxInstanceLen)
	}
	n := frameHeader - 4 + len(instance)
	for _, p := range payload {
		n += len(p)
	}
	if n > maxFrame {
		return fmt.Errorf("frame of %d bytes exceeds %d", n, maxFrame)
	}
	b := f.out[:0]
	b = binary.BigEndian.AppendUint32(b, uint32(n))
	b = append(b, Version, typ)
	b = binary.BigEndian.AppendUint64(b, f.sendSeq)
	b = binary.BigEndian.AppendUint16(b, uint16(len(instance)))
	b = append(b, instance...)
	for _, p := range payload {
		b = append(b, p...)
	}
	f.out = b[:0]
	f.sendSeq++
	_, err := f.w.Write(b)
	return err
}

// read receives the next frame and checks version, type and sequence.
func (f *framer) read(want ...byte) (frame, error) {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(f.r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return frame{}, fmt.Errorf("%w: frame header truncated", ErrProtocol)
		}
		return frame{}, err
	}
	n := binary.BigEndian.Uint32(hdr[0:4])
	if n < frameHeader-4 || n > maxFrame {
		return frame{}, fmt.Errorf("%w: frame length %d", ErrProtocol, n)
	}
	if hdr[4] != Version {
		return frame{}, fmt.Errorf("%w: version %d, want %d", ErrProtocol, hdr[4], Version)
	}
	fr := frame{typ: hdr[5], seq: binary.BigEndian.Uint64(hdr[6:14])}
	if fr.seq != f.recvSeq {
		return frame{}, fmt.Errorf("%w: sequence number %d, want %d (replayed, dropped or reordered frame)", ErrProtocol, fr.seq, f.recvSeq)
	}
	ilen := int(binary.BigEndian.Uint16(hdr[14:16]))
	body := int(n) - (frameHeader - 4)
	if ilen > maxInstanceLen || ilen > body {
		return frame{}, fmt.Errorf("%w: instance id length %d", ErrProtocol, ilen)
	}
	var buf []byte
	if cap(f.in) < body && body > 64<<10 {
		// A large declared length gets memory only as its bytes arrive.
		b, err := io.ReadAll(io.LimitReader(f.r, int64(body)))
		if err == nil && len(b) < body {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return frame{}, fmt.Errorf("%w: frame body truncated: %v", ErrProtocol, err)
		}
		buf = b
	} else {
		if cap(f.in) < body {
			f.in = make([]byte, body)
		}
		buf = f.in[:body]
		if _, err := io.ReadFull(f.r, buf); err != nil {
			return frame{}, fmt.Errorf("%w: frame body truncated: %v", ErrProtocol, err)
		}
	}
	f.recvSeq++
	fr.instance, fr.payload = string(buf[:ilen]), buf[ilen:]
	if fr.typ == frameError {
		return frame{}, &RemoteError{Msg: string(fr.payload)}
	}
	for _, w := range want {
		if fr.typ == w {
			return fr, nil
		}
	}
	return frame{}, fmt.Errorf("%w: unexpected frame type %d", ErrProtocol, fr.typ)
}

// RemoteError is the reason the other end gave for ending the session.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return "attested link closed by peer: " + e.Msg }
