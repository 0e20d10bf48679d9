package swtpmproto

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"syscall"
)

// Streamer is a TPM that serves a kept data connection's commands itself,
// without returning to the server between them (*engine.TPM, in C:
// engine/stream.go says why). The server hands it a connection that keeps
// talking; a TPM that is not a Streamer (a frontend's remote engine) is
// served command by command.
type Streamer interface {
	// ServeStream serves fd, starting with the bytes in pending, until
	// the peer closes or stop is set and fd is shut down; fd stays open.
	// Frames are as ParseFrame reads them, commands of at most maxCommand
	// bytes; once ends it after one command; rejectLocality4 answers a
	// prefix at locality 4 with TPM_RC_LOCALITY, as answer does.
	ServeStream(fd int, pending []byte, maxCommand int, once, rejectLocality4 bool, stop *atomic.Int32) (commands uint64, err error)
}

// maxStreams bounds the connections served by the Streamer at once: each
// holds an OS thread while it lasts (waiting in read(2), as swtpm's one
// thread does). Further connections are served in Go, as they were before
// (fdio.go), whose waits hold no thread; the connection QEMU passes with
// CMD_SET_DATAFD does not count against it.
const maxStreams = 8

// streamer returns the TPM's Streamer, or nil when it has none or the
// server is told not to use it.
func (s *Server) streamer() Streamer {
	if s.opts.NoStreamLoop {
		return nil
	}
	st, _ := s.tpm.(Streamer)
	return st
}

// serveStream serves fd (owned by the caller, which closes it) with the
// Streamer, starting with the bytes in in, and reports whether it did;
// false leaves everything to the caller. reserved says the connection
// does not need one of the maxStreams slots.
func (s *Server) serveStream(ctx context.Context, fd *ownedFD, in []byte, once, reserved bool) bool {
	st := s.streamer()
	if st == nil {
		return false
	}
	if !reserved {
		if s.streams.Add(1) > maxStreams {
			s.streams.Add(-1)
			return false
		}
		defer s.streams.Add(-1)
	}
	// The loop waits in poll(2) when a read would block; a receive timeout
	// left from the Go path would only wake it for nothing.
	syscall.SetsockoptTimeval(fd.fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{})
	var stop atomic.Int32
	// Closing fd would not wake a read blocked on it; shutdown does.
	unblock := context.AfterFunc(ctx, func() { stop.Store(1); fd.shutdown() })
	defer unblock()
	s.streamsServed.Add(1)
	_, err := st.ServeStream(fd.fd, in, s.maxCommandSize()+prefixLen, once, s.opts.RejectLocality4, &stop)
	if err != nil && ctx.Err() == nil && !errors.Is(err, io.EOF) {
		s.log.Debug("data channel closed", "err", err)
	}
	return true
}
