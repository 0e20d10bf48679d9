// Package tpmrpc carries the calls of a swtpm-style TPM (swtpmproto.TPM) as
// small binary messages, so that the TPM can live in another process: a
// backend worker behind a socketpair, or an instance behind the attested
// link. Client turns calls into messages, Handle turns messages back into
// calls on a real TPM. The transport (framing, sequence numbers, encryption)
// is the caller's business; ServeConn and ConnCaller provide a plain
// length-prefixed one for trusted local sockets.
//
// Request:  op u8 | locality u8 | arg u64 | payload
// Response: status u8 | rc u32 | v1 u32 | v2 u32 | v3 u32 | payload
//
// All integers are big-endian. status 0 means the call returned (rc is its
// swtpm result code); status 1 means it failed and payload is the error
// text.
package tpmrpc

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Op names a swtpmproto.TPM method.
type Op uint8

// The operations, one per swtpmproto.TPM method.
const (
	OpInit Op = iota + 1
	OpStop
	OpRunning
	OpExecute // arg: ExecuteAtLocality or 0 (the TPM's current locality)
	OpSetLocality
	OpEstablished
	OpResetEstablished
	OpHashStart
	OpHashData
	OpHashEnd
	OpCancel
	OpStoreVolatile
	OpSetBufferSize
	OpInfo
	OpGetState
	OpSetState
	OpMaxCommandSize
	// OpGeneration asks the worker for its state generation (V[0] high,
	// V[1] low 32 bits). The backend's own call: no link caller may make it.
	OpGeneration
	// OpLockHost: the workload closes the host path of an instance bound
	// with host "boot" until the next reset (CapLock).
	OpLockHost
	// OpDirectAttach gives the worker a direct session (internal/
	// directlink): the socket comes with the message (SCM_RIGHTS), Arg is
	// the session's id, Payload its grant (AppendDirectGrant). The
	// backend's own call: no link caller may make it.
	OpDirectAttach
	// OpDirectSync renews the worker's serving lease and ends the direct
	// sessions the supervisor names (AppendDirectSync); the answer's
	// payload lists the sessions still open. The backend's own call.
	OpDirectSync
	opEnd
)

var opNames = [...]string{"", "init", "stop", "running", "execute", "set-locality", "established",
	"reset-established", "hash-start", "hash-data", "hash-end", "cancel", "store-volatile",
	"set-buffer-size", "info", "get-state", "set-state", "max-command-size", "generation", "lock-host",
	"direct-attach", "direct-sync"}

func (o Op) String() string {
	if o > 0 && o < opEnd {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// ExecuteAtLocality in an OpExecute request's Arg selects ExecuteAt (set
// the locality, as TPM_SEND_COMMAND does) rather than Execute.
const ExecuteAtLocality = 1

// Header sizes.
const (
	RequestHeaderSize  = 10
	ResponseHeaderSize = 17
	// MaxMessage bounds a message: TPM commands are at most a few KiB, state
	// blobs at most some hundred KiB.
	MaxMessage = 1 << 20
)

// Request is one call.
type Request struct {
	Op       Op
	Locality uint8
	Arg      uint64
	Payload  []byte
}

// AppendRequest appends the encoding of r to dst.
func AppendRequest(dst []byte, r Request) []byte {
	dst = append(dst, byte(r.Op), r.Locality)
	dst = binary.BigEndian.AppendUint64(dst, r.Arg)
	return append(dst, r.Payload...)
}

// ErrMalformed wraps every decoding error.
var ErrMalformed = errors.New("tpmrpc: malformed message")

// ParseRequest decodes a request; Payload aliases b.
func ParseRequest(b []byte) (Request, error) {
	if len(b) < RequestHeaderSize {
		return Request{}, fmt.Errorf("%w: request is %d bytes, shorter than its %d-byte header", ErrMalformed, len(b), RequestHeaderSize)
	}
	if len(b) > MaxMessage {
		return Request{}, fmt.Errorf("%w: request is %d bytes, more than %d", ErrMalformed, len(b), MaxMessage)
	}
	r := Request{Op: Op(b[0]), Locality: b[1], Arg: binary.BigEndian.Uint64(b[2:10]), Payload: b[10:]}
	if r.Op == 0 || r.Op >= opEnd {
		return Request{}, fmt.Errorf("%w: unknown operation %d", ErrMalformed, b[0])
	}
	if r.Locality > 4 {
		return Request{}, fmt.Errorf("%w: locality %d (0..4)", ErrMalformed, r.Locality)
	}
	return r, nil
}

// Response is one call's result.
type Response struct {
	RC      uint32
	V       [3]uint32
	Payload []byte
	Err     string // non-empty: the call failed with this error
}

// AppendResponse appends the encoding of r to dst.
func AppendResponse(dst []byte, r Response) []byte {
	status := byte(0)
	payload := r.Payload
	if r.Err != "" {
		status, payload = 1, []byte(r.Err)
	}
	dst = append(dst, status)
	dst = binary.BigEndian.AppendUint32(dst, r.RC)
	for _, v := range r.V {
		dst = binary.BigEndian.AppendUint32(dst, v)
	}
	return append(dst, payload...)
}

// ParseResponse decodes a response; Payload aliases b.
func ParseResponse(b []byte) (Response, error) {
	if len(b) < ResponseHeaderSize {
		return Response{}, fmt.Errorf("%w: response is %d bytes, shorter than its %d-byte header", ErrMalformed, len(b), ResponseHeaderSize)
	}
	if len(b) > MaxMessage {
		return Response{}, fmt.Errorf("%w: response is %d bytes, more than %d", ErrMalformed, len(b), MaxMessage)
	}
	r := Response{RC: binary.BigEndian.Uint32(b[1:5]), Payload: b[ResponseHeaderSize:]}
	for i := range r.V {
		r.V[i] = binary.BigEndian.Uint32(b[5+4*i:])
	}
	switch b[0] {
	case 0:
	case 1:
		r.Err = string(r.Payload)
		if r.Err == "" {
			r.Err = "unspecified error"
		}
		r.Payload = nil
	default:
		return Response{}, fmt.Errorf("%w: response status %d", ErrMalformed, b[0])
	}
	return r, nil
}
