package swtpmproto

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// tpmSendCommand is the mssim/TCG platform command that prefixes a TPM
// command with locality and size: u32 8 | u8 locality | u32 size | command.
const tpmSendCommand = 8

const (
	prefixLen    = 9
	tpmHeaderLen = 10
)

// Frame is one parsed data-channel message.
type Frame struct {
	Prefixed bool  // TPM_SEND_COMMAND prefix present: answer size|response|u32 0
	Locality uint8 // from the prefix
	Start    int   // offset of the TPM command
	End      int   // offset after the TPM command
}

var errEOF = io.EOF

// ErrFrame reports a data-channel message that cannot be a TPM command.
var ErrFrame = errors.New("bad TPM data frame")

// ParseFrame inspects the bytes received so far. It returns need > len(b)
// when more bytes are needed, or the frame once b holds all of it. maxCmd
// bounds the TPM command size.
func ParseFrame(b []byte, maxCmd int) (f Frame, need int, err error) {
	if len(b) < 6 {
		return f, 6, nil
	}
	tag := binary.BigEndian.Uint16(b)
	if tag == 0 && binary.BigEndian.Uint32(b) == tpmSendCommand {
		if len(b) < prefixLen {
			return f, prefixLen, nil
		}
		size := binary.BigEndian.Uint32(b[5:])
		if size < tpmHeaderLen || size > uint32(maxCmd) {
			return f, 0, fmt.Errorf("%w: TPM_SEND_COMMAND size %d outside %d..%d", ErrFrame, size, tpmHeaderLen, maxCmd)
		}
		f = Frame{Prefixed: true, Locality: b[4], Start: prefixLen, End: prefixLen + int(size)}
		return f, f.End, nil
	}
	size := binary.BigEndian.Uint32(b[2:])
	if size < tpmHeaderLen || size > uint32(maxCmd) {
		return f, 0, fmt.Errorf("%w: command size %d outside %d..%d (tag 0x%04x)", ErrFrame, size, tpmHeaderLen, maxCmd, tag)
	}
	f = Frame{Start: 0, End: int(size)}
	return f, f.End, nil
}

// ServeData serves the data channel on ln until ctx ends. Each connection
// may carry any number of commands (swtpm keeps the connection unless
// --server ...,disconnect); with disconnect, it is closed after one.
// Connections are served concurrently; a connection's first command is
// answered on the accepting goroutine (inline.go).
func (s *Server) ServeData(ctx context.Context, ln net.Listener, disconnect bool) error {
	if ok, err := s.serveDataInline(ctx, ln, disconnect); ok {
		return err
	}
	return s.serve(ctx, ln, func(ctx context.Context, c net.Conn) {
		s.handleDataConn(ctx, c, disconnect, false)
	})
}

// HandleData serves data-channel commands on rw until EOF or error.
func (s *Server) HandleData(ctx context.Context, rw io.ReadWriter, once bool) {
	bufs := s.buffers.Get().(*connBuffers)
	s.handleData(ctx, rw, once, bufs, bufs.in[:0])
}

// handleData is HandleData with bufs taken from the pool and the first
// bytes of the stream already in in (which is bufs.in's storage).
func (s *Server) handleData(ctx context.Context, rw io.ReadWriter, once bool, bufs *connBuffers, in []byte) {
	maxCmd := s.maxCommandSize() + prefixLen
	defer s.buffers.Put(bufs)
	out := bufs.out[:0]
	defer func() { bufs.in, bufs.out = in[:0], out[:0] }()
	for ctx.Err() == nil {
		f, err := readFrame(rw, &in, maxCmd)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.log.Debug("data channel closed", "err", err)
			}
			return
		}
		if ctx.Err() != nil { // stopped while the command arrived
			return
		}
		out = s.answer(out[:0], in, f)
		if _, err := rw.Write(out); err != nil {
			s.log.Debug("data channel write failed", "err", err)
			return
		}
		// Keep any bytes of the next command that arrived with this one.
		n := copy(in, in[f.End:])
		in = in[:n]
		if once {
			return
		}
		// A connection that keeps talking goes on in the TPM's own loop.
		if l, ok := rw.(*lazyConn); ok && l.stream(s, in) {
			return
		}
	}
}

// connBuffers are one connection's reusable command and response buffers.
type connBuffers struct{ in, out []byte }

func newConnBuffers() any {
	return &connBuffers{in: make([]byte, 0, 4096+prefixLen), out: make([]byte, 0, 4096+prefixLen+8)}
}

// maxCommandSize is the engine's largest command, asked once.
func (s *Server) maxCommandSize() int {
	s.maxCmdOnce.Do(func() { s.maxCmd = s.tpm.MaxCommandSize() })
	return s.maxCmd
}

// answer runs the command of frame f in buf and appends the full reply to out.
func (s *Server) answer(out, buf []byte, f Frame) []byte {
	cmd := buf[f.Start:f.End]
	if !f.Prefixed {
		return s.tpm.Execute(out, cmd)
	}
	out = append(out, 0, 0, 0, 0)
	if f.Locality > 4 || (f.Locality == 4 && s.opts.RejectLocality4) {
		out = appendTPM2Error(out, 0x107) // TPM_RC_LOCALITY
	} else {
		out = s.tpm.ExecuteAt(out, cmd, f.Locality)
	}
	binary.BigEndian.PutUint32(out, uint32(len(out)-4))
	return append(out, 0, 0, 0, 0)
}

func appendTPM2Error(dst []byte, rc uint32) []byte {
	return append(dst, 0x80, 0x01, 0, 0, 0, 10, byte(rc>>24), byte(rc>>16), byte(rc>>8), byte(rc))
}

// readFrame reads into *buf (which may already hold bytes) until it holds
// one whole frame, growing *buf as needed.
func readFrame(r io.Reader, buf *[]byte, maxCmd int) (Frame, error) {
	return readUntil(r, buf, func(b []byte) (Frame, int, error) { return ParseFrame(b, maxCmd) })
}

// readUntil reads into *buf (which may already hold bytes) until parse
// finds a whole message in it, growing *buf to what parse says it needs.
// parse returns need > len(b) while the message is incomplete. It serves
// both the swtpm data channel and the mssim command port.
func readUntil[M any](r io.Reader, buf *[]byte, parse func(b []byte) (M, int, error)) (M, error) {
	b := *buf
	for {
		m, need, err := parse(b)
		if err != nil {
			return m, err
		}
		if len(b) >= need {
			*buf = b
			return m, nil
		}
		if cap(b) < need {
			nb := make([]byte, len(b), need)
			copy(nb, b)
			b = nb
		}
		n, err := r.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		*buf = b
		if err != nil && (n == 0 || len(b) < need) {
			if errors.Is(err, io.EOF) && len(b) > 0 {
				return m, io.ErrUnexpectedEOF
			}
			return m, err
		}
	}
}
