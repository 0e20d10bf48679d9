package engine

/*
#include <stdint.h>
#include "stream.h"
*/
import "C"

import (
	"fmt"
	"io"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Serving a data listener in C.
//
// A client that opens a connection per command (tpm2-tss's swtpm TCTI)
// gets no help from ServeStream: each connection is one command. In Go,
// each such connection costs the accepting goroutine a park in the
// netpoller and a wake-up, and the process twice swtpm's CPU. ServeListener
// accepts and answers on the calling thread instead, with swtpm's system
// calls (ppoll, accept4, recv, send, close), and returns to Go only when a
// connection must go on elsewhere, when nothing arrived before the
// timeout, or when accepting failed.

// ServeListener accepts connections on the listening socket lfd and, for
// each, answers its first command inline: it waits at most 2 ms for the
// command's bytes and then for the client to close, and not at all while
// another connection is waiting (the policy of swtpmproto's inline.go).
// It returns the number of connections it accepted, and:
//   - fd >= 0: a connection that goes on elsewhere (it kept talking,
//     pipelined, trickled or stayed silent), its first pending bytes in
//     buf[:pending]; idle says nothing arrived after its last answer;
//   - fd < 0 and a nil error: nothing to accept within timeout, or stop
//     was set (and stopfd made readable, which wakes the wait);
//   - an error: accept(2) or poll(2) on lfd failed.
//
// A connection that closes, fails, or sends bytes that cannot be a command
// is closed here (logged at debug level). buf must hold a whole frame: the
// prefix and maxCommand bytes. once closes each connection after its
// answer; tcp sets TCP_NODELAY on each.
func (t *TPM) ServeListener(lfd, stopfd int, timeout time.Duration, tcp bool, maxCommand int, rejectLocality4, once bool, stop *atomic.Int32, buf []byte) (fd, pending int, idle bool, accepted uint64, err error) {
	if maxCommand < 10 || len(buf) < maxCommand+C.CVTPM_PREFIX_LEN {
		return -1, 0, false, 0, fmt.Errorf("engine: a %d-byte buffer for commands of at most %d bytes", len(buf), maxCommand)
	}
	deadline := time.Now().Add(timeout)
	var res C.struct_cvtpm_accept_result
	for {
		ms := time.Until(deadline).Milliseconds()
		if ms < 1 {
			ms = 1
		}
		status := C.cvtpm_serve_listener(C.int(lfd), C.int(stopfd), C.int(min(ms, 1<<30)), cBool(tcp), C.uint32_t(maxCommand),
			cBool(rejectLocality4), cBool(once), (*C.int32_t)(unsafe.Pointer(stop)),
			(*C.uchar)(unsafe.Pointer(&buf[0])), C.uint32_t(len(buf)), &res)
		accepted += uint64(res.accepted)
		switch status {
		case C.CVTPM_ACCEPT_HANDOFF:
			return int(res.fd), int(res.pending), res.idle != 0, accepted, nil
		case C.CVTPM_ACCEPT_TIMEOUT, C.CVTPM_ACCEPT_STOPPED:
			return -1, 0, false, accepted, nil
		case C.CVTPM_ACCEPT_ERR:
			return -1, 0, false, accepted, fmt.Errorf("engine: accepting data connections: %w", syscall.Errno(res.err))
		}
		// A connection ended badly: say why, then go on accepting.
		var why error
		switch status {
		case C.CVTPM_ACCEPT_TRUNCATED:
			why = io.ErrUnexpectedEOF
		case C.CVTPM_ACCEPT_BAD_FRAME:
			why = &FrameError{Header: C.GoBytes(unsafe.Pointer(&res.header[0]), res.header_len)}
		default:
			why = fmt.Errorf("engine: data connection: %w", syscall.Errno(res.err))
		}
		t.log.Debug("data channel closed", "err", why)
		if stop.Load() != 0 || !time.Now().Before(deadline) {
			return -1, 0, false, accepted, nil
		}
	}
}
