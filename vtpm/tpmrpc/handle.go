package tpmrpc

import (
	"errors"
	"fmt"

	"cvtpm/vtpm/swtpmproto"
)

// ErrNoState is what StateTransfer.ExportState returns (wrapped) when
// there is no such blob; the caller gets swtpm's TPM_RETRY.
var ErrNoState = errors.New("no such state blob")

// rcRetry is TPM_RETRY.
const rcRetry = 0x800

// StateTransfer is implemented by a TPM whose state calls may be refused
// with a reason (the backend worker's vtpm/migration.TPM); Handle then
// uses it for get-state and set-state and reports the reason.
type StateTransfer interface {
	ExportState(blobType uint32) ([]byte, error)
	ImportState(blobType uint32, blob []byte) error
}

// Handle performs the call encoded in req on tpm and appends the encoded
// response to dst. A malformed request yields an error response; tpm is
// not touched.
func Handle(tpm swtpmproto.TPM, req, dst []byte) []byte {
	r, err := ParseRequest(req)
	if err != nil {
		return AppendResponse(dst, Response{Err: err.Error()})
	}
	if r.Op == OpExecute {
		// The hot path: the TPM appends its response right after the header.
		dst = AppendResponse(dst, Response{})
		if r.Arg&ExecuteAtLocality != 0 {
			return tpm.ExecuteAt(dst, r.Payload, r.Locality)
		}
		return tpm.Execute(dst, r.Payload)
	}
	return AppendResponse(dst, call(tpm, r))
}

// call runs one request other than Execute.
func call(tpm swtpmproto.TPM, r Request) Response {
	b2u := func(b bool) uint32 {
		if b {
			return 1
		}
		return 0
	}
	switch r.Op {
	case OpInit:
		return Response{RC: tpm.Init(uint32(r.Arg))}
	case OpStop:
		tpm.Stop()
		return Response{}
	case OpRunning:
		return Response{V: [3]uint32{b2u(tpm.Running())}}
	case OpSetLocality:
		return Response{RC: tpm.SetLocality(r.Locality)}
	case OpEstablished:
		est, rc := tpm.Established()
		return Response{RC: rc, V: [3]uint32{b2u(est)}}
	case OpResetEstablished:
		return Response{RC: tpm.ResetEstablished(r.Locality)}
	case OpHashStart:
		return Response{RC: tpm.HashStart()}
	case OpHashData:
		return Response{RC: tpm.HashData(r.Payload)}
	case OpHashEnd:
		return Response{RC: tpm.HashEnd()}
	case OpCancel:
		return Response{RC: tpm.Cancel()}
	case OpStoreVolatile:
		return Response{RC: tpm.StoreVolatile()}
	case OpSetBufferSize:
		size, lo, hi, err := tpm.SetBufferSize(uint32(r.Arg))
		if err != nil {
			return Response{Err: err.Error()}
		}
		return Response{V: [3]uint32{size, lo, hi}}
	case OpInfo:
		s, err := tpm.Info(r.Arg)
		if err != nil {
			return Response{Err: err.Error()}
		}
		return Response{Payload: []byte(s)}
	case OpGetState:
		if st, ok := tpm.(StateTransfer); ok {
			blob, err := st.ExportState(uint32(r.Arg))
			if errors.Is(err, ErrNoState) {
				return Response{RC: rcRetry}
			}
			if err != nil {
				return Response{RC: rcFail, Err: err.Error()}
			}
			return Response{Payload: blob}
		}
		blob, rc := tpm.GetState(uint32(r.Arg))
		return Response{RC: rc, Payload: blob}
	case OpSetState:
		if st, ok := tpm.(StateTransfer); ok {
			if err := st.ImportState(uint32(r.Arg), r.Payload); err != nil {
				return Response{RC: rcFail, Err: err.Error()}
			}
			return Response{}
		}
		return Response{RC: tpm.SetState(uint32(r.Arg), r.Payload)}
	case OpMaxCommandSize:
		return Response{V: [3]uint32{uint32(tpm.MaxCommandSize())}}
	case OpGeneration:
		if g, ok := tpm.(interface{ Generation() uint64 }); ok {
			v := g.Generation()
			return Response{V: [3]uint32{uint32(v >> 32), uint32(v)}}
		}
		return Response{Err: "this TPM keeps no state generation"}
	}
	return Response{Err: fmt.Sprintf("unknown operation %v", r.Op)}
}
