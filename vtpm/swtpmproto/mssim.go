package swtpmproto

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// Microsoft TPM simulator ("mssim") codes, as the tpm2-tss mssim TCTI sends
// them: the command port carries TPM_SEND_COMMAND frames, the platform port
// (command port + 1) the signals, each answered by a u32 0.
const (
	MssimSignalPowerOn     = 1
	MssimSignalPowerOff    = 2
	MssimSignalPPOn        = 3
	MssimSignalPPOff       = 4
	MssimSignalHashStart   = 5
	MssimSignalHashData    = 6
	MssimSignalHashEnd     = 7
	MssimSendCommand       = 8
	MssimSignalCancelOn    = 9
	MssimSignalCancelOff   = 10
	MssimSignalNVOn        = 11
	MssimSignalNVOff       = 12
	MssimSignalKeyCacheOn  = 13
	MssimSignalKeyCacheOff = 14
	MssimRemoteHandshake   = 15
	MssimSignalReset       = 17
	MssimSignalRestart     = 18
	MssimSessionEnd        = 20
	MssimStop              = 21
)

// ErrMssim reports a malformed mssim message.
var ErrMssim = errors.New("bad mssim message")

// MssimMessage is one parsed message on the mssim command port.
type MssimMessage struct {
	Code  uint32
	Frame Frame // for MssimSendCommand
	Data  []byte
	End   int // bytes the message occupies
}

// ParseMssimCommand parses one command-port message from b. need > len(b)
// means more bytes are needed.
func ParseMssimCommand(b []byte, maxCmd int) (m MssimMessage, need int, err error) {
	if len(b) < 4 {
		return m, 4, nil
	}
	m.Code = binary.BigEndian.Uint32(b)
	switch m.Code {
	case MssimSendCommand:
		if len(b) < prefixLen {
			return m, prefixLen, nil
		}
		size := binary.BigEndian.Uint32(b[5:])
		if size < tpmHeaderLen || size > uint32(maxCmd) {
			return m, 0, fmt.Errorf("%w: TPM_SEND_COMMAND size %d outside %d..%d", ErrMssim, size, tpmHeaderLen, maxCmd)
		}
		m.Frame = Frame{Prefixed: true, Locality: b[4], Start: prefixLen, End: prefixLen + int(size)}
		m.End = m.Frame.End
	case MssimSignalHashData:
		if len(b) < 8 {
			return m, 8, nil
		}
		n := binary.BigEndian.Uint32(b[4:])
		if n > uint32(maxCmd) {
			return m, 0, fmt.Errorf("%w: hash data of %d bytes exceeds %d", ErrMssim, n, maxCmd)
		}
		m.End = 8 + int(n)
		if len(b) >= m.End {
			m.Data = b[8:m.End]
		}
	case MssimRemoteHandshake:
		m.End = 8
		if len(b) >= 8 {
			m.Data = b[4:8]
		}
	case MssimSignalHashStart, MssimSignalHashEnd, MssimSessionEnd, MssimStop:
		m.End = 4
	default:
		return m, 0, fmt.Errorf("%w: unknown command-port code %d", ErrMssim, m.Code)
	}
	return m, m.End, nil
}

// ServeMssimCommand serves the mssim command port on ln until ctx ends.
func (s *Server) ServeMssimCommand(ctx context.Context, ln net.Listener) error {
	return s.serve(ctx, ln, s.HandleMssimCommand)
}

// ServeMssimPlatform serves the mssim platform port on ln until ctx ends.
func (s *Server) ServeMssimPlatform(ctx context.Context, ln net.Listener) error {
	return s.serve(ctx, ln, s.HandleMssimPlatform)
}

// HandleMssimCommand serves one mssim command-port connection.
func (s *Server) HandleMssimCommand(ctx context.Context, conn net.Conn) {
	c := &lazyConn{ctx: ctx, c: conn}
	defer c.close()
	maxCmd := s.maxCommandSize()
	buf := make([]byte, 0, 4096+prefixLen)
	out := make([]byte, 0, 4096+prefixLen+4)
	for ctx.Err() == nil {
		var parseErr error
		m, err := readUntil(c, &buf, func(b []byte) (MssimMessage, int, error) {
			m, need, err := ParseMssimCommand(b, maxCmd)
			parseErr = err
			return m, need, err
		})
		if err != nil {
			// A malformed command is worth a warning; a connection that
			// ends or fails (client gone, server stopping) is not.
			if parseErr != nil {
				s.log.Warn("mssim command port: closing connection", "err", parseErr)
			}
			return
		}
		out = out[:0]
		switch m.Code {
		case MssimSendCommand:
			out = s.answer(out, buf, m.Frame)
		case MssimRemoteHandshake:
			// server version 1, flags: powered, NV available, TPM 2.0 locality support
			out = append(out, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0)
		case MssimSignalHashStart:
			s.tpm.HashStart()
			out = append(out, 0, 0, 0, 0)
		case MssimSignalHashData:
			s.tpm.HashData(m.Data)
			out = append(out, 0, 0, 0, 0)
		case MssimSignalHashEnd:
			s.tpm.HashEnd()
			out = append(out, 0, 0, 0, 0)
		case MssimSessionEnd, MssimStop:
			return // the simulator closes without a reply
		}
		if _, err := c.Write(out); err != nil {
			return
		}
		n := copy(buf, buf[m.End:])
		buf = buf[:n]
	}
}

// HandleMssimPlatform serves one mssim platform-port connection.
func (s *Server) HandleMssimPlatform(ctx context.Context, c net.Conn) {
	var code [4]byte
	for ctx.Err() == nil {
		if _, err := io.ReadFull(c, code[:]); err != nil {
			return
		}
		switch binary.BigEndian.Uint32(code[:]) {
		case MssimSignalPowerOn:
			// Like the simulator's _TPM_Init: a powered-on TPM stays as is;
			// the client then sends TPM2_Startup.
			if !s.tpm.Running() {
				if rc := s.tpm.Init(0); rc != 0 {
					s.log.Error("mssim power on: TPM init failed", "rc", rc)
				}
			}
		case MssimSignalReset, MssimSignalRestart:
			if rc := s.tpm.Init(0); rc != 0 {
				s.log.Error("mssim reset: TPM init failed", "rc", rc)
			}
		case MssimSignalPowerOff:
			s.tpm.Stop()
		case MssimSignalCancelOn:
			s.tpm.Cancel()
		case MssimSignalPPOn, MssimSignalPPOff, MssimSignalCancelOff, MssimSignalNVOn, MssimSignalNVOff,
			MssimSignalKeyCacheOn, MssimSignalKeyCacheOff:
		case MssimSessionEnd, MssimStop:
			return
		default:
			s.log.Warn("mssim platform port: unknown code, closing connection", "code", binary.BigEndian.Uint32(code[:]))
			return
		}
		if _, err := c.Write([]byte{0, 0, 0, 0}); err != nil {
			return
		}
	}
}
