package engine

/*
#include <stdint.h>
#include "stream.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
	"syscall"
	"unsafe"
)

// Serving a kept data connection in C.
//
// A command that arrives after the process has idled costs a Go process
// far more CPU than libtpms spends on it: once every P is idle the
// runtime's sysmon thread sleeps deeply, the next cgo call (into libtpms)
// wakes it as if from a system call, and it then polls every 20 us for a
// millisecond (golang/go#18236; measured here at about 24 us of CPU per
// poll, 7-8x swtpm's CPU for a burst of commands). ServeStream runs a
// connection's whole read, libtpms and write loop in one cgo call, on the
// calling goroutine's thread: between commands that thread waits in
// poll(2) and reads, like swtpm's, and the Go runtime is not entered again (the P is
// given back to other goroutines; only a state write, through the NVRAM
// callbacks, calls back into Go).

// ServeStream serves the swtpm data-channel commands arriving on fd (a
// connected stream socket, blocking or not), starting with the bytes in
// pending, until the peer closes (nil) or stop is set and fd shut down
// (nil). Commands are raw TPM commands or carry the TPM_SEND_COMMAND
// prefix, of at most maxCommand bytes each; once ends it after one
// command; rejectLocality4 answers a prefix at locality 4 with
// TPM_RC_LOCALITY. Bytes that cannot be a command end it with a
// *FrameError holding them, for the caller to describe. It returns the
// number of commands answered. fd stays open.
//
// It holds the calling thread for the connection's life, so a server
// bounds how many connections it serves this way.
func (t *TPM) ServeStream(fd int, pending []byte, maxCommand int, once, rejectLocality4 bool, stop *atomic.Int32) (commands uint64, err error) {
	if maxCommand < 10 || maxCommand > 1<<24 || len(pending) > 1<<24 {
		return 0, fmt.Errorf("engine: a stream of commands of at most %d bytes with %d pending", maxCommand, len(pending))
	}
	var p *C.uchar
	if len(pending) > 0 {
		p = (*C.uchar)(unsafe.Pointer(&pending[0]))
	}
	var end C.struct_cvtpm_stream_end
	status := C.cvtpm_serve_stream(C.int(fd), p, C.uint32_t(len(pending)), C.uint32_t(maxCommand),
		cBool(rejectLocality4), cBool(once), (*C.int32_t)(unsafe.Pointer(stop)), &end)
	commands = uint64(end.commands)
	switch status {
	case C.CVTPM_STREAM_EOF, C.CVTPM_STREAM_STOPPED:
		return commands, nil
	case C.CVTPM_STREAM_TRUNCATED:
		return commands, io.ErrUnexpectedEOF
	case C.CVTPM_STREAM_BAD_FRAME:
		h := C.GoBytes(unsafe.Pointer(&end.header[0]), end.header_len)
		return commands, &FrameError{Header: h}
	default:
		return commands, fmt.Errorf("engine: data stream: %w", syscall.Errno(end.err))
	}
}

// FrameError reports bytes on a data stream that cannot be a TPM command.
type FrameError struct {
	Header []byte // the first bytes of it (at most the prefix's 9)
}

func (e *FrameError) Error() string {
	return fmt.Sprintf("engine: data stream: bytes %x cannot start a TPM command", e.Header)
}

// ErrBadFrame matches every *FrameError.
var ErrBadFrame = errors.New("bad TPM data frame")

func (e *FrameError) Is(target error) bool { return target == ErrBadFrame }

// ParseFrame is the stream loop's frame parser (for tests: it must agree
// with swtpmproto.ParseFrame). need > len(b) means incomplete; need == 0
// means b cannot start a command.
func ParseFrame(b []byte, maxCommand int) (prefixed bool, locality uint8, start, end, need int) {
	var f C.struct_cvtpm_frame
	var p *C.uchar
	if len(b) > 0 {
		p = (*C.uchar)(unsafe.Pointer(&b[0]))
	}
	n := int(C.cvtpm_parse_frame(p, C.uint32_t(len(b)), C.uint32_t(maxCommand), &f))
	if n == 0 || n > len(b) {
		return false, 0, 0, 0, n
	}
	return f.prefixed != 0, uint8(f.locality), int(f.start), int(f.end), n
}

func cBool(b bool) C.int {
	if b {
		return 1
	}
	return 0
}

// processFailed logs a command libtpms could not process (it was answered
// TPM_RC_FAILURE).
func processFailed(log *slog.Logger, rc uint32) {
	log.Error("libtpms: processing a command failed", "rc", rc)
}

// cvtpmGoProcessFailed is processFailed for a stream loop.
//
//export cvtpmGoProcessFailed
func cvtpmGoProcessFailed(rc C.uint32_t) {
	if t := active; t != nil {
		processFailed(t.log, uint32(rc))
	}
}
