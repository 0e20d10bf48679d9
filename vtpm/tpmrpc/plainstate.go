package tpmrpc

import (
	"encoding/binary"
	"fmt"
)

// Between a backend's supervisor and its worker, get-state and set-state
// carry a state blob in the clear with its generation:
//
//	generation u64 big-endian | libtpms blob
//
// The worker never holds the migration key: the supervisor seals what a
// worker exports (for the instance, the blob's name and the generation)
// before it leaves the backend, and opens what arrives before the worker
// sees it. These messages exist only on the worker's socketpair; a caller
// of the backend sends and receives sealed envelopes.

// AppendPlainState appends a plain state message to dst.
func AppendPlainState(dst []byte, generation uint64, blob []byte) []byte {
	dst = binary.BigEndian.AppendUint64(dst, generation)
	return append(dst, blob...)
}

// ParsePlainState splits a plain state message; blob aliases b.
func ParsePlainState(b []byte) (generation uint64, blob []byte, err error) {
	if len(b) < 8 {
		return 0, nil, fmt.Errorf("%w: plain state message of %d bytes, want a generation and a blob", ErrMalformed, len(b))
	}
	return binary.BigEndian.Uint64(b), b[8:], nil
}
