package swtpmproto

import (
	"context"
	"cvtpm/vtpm/swtpmblob"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"syscall"
	"time"
)

// Control channel commands (include/swtpm/tpm_ioctl.h).
const (
	CmdGetCapability       = 0x01
	CmdInit                = 0x02
	CmdShutdown            = 0x03
	CmdGetTPMEstablished   = 0x04
	CmdSetLocality         = 0x05
	CmdHashStart           = 0x06
	CmdHashData            = 0x07
	CmdHashEnd             = 0x08
	CmdCancelTPMCmd        = 0x09
	CmdStoreVolatile       = 0x0a
	CmdResetTPMEstablished = 0x0b
	CmdGetStateBlob        = 0x0c
	CmdSetStateBlob        = 0x0d
	CmdStop                = 0x0e
	CmdGetConfig           = 0x0f
	CmdSetDataFD           = 0x10
	CmdSetBufferSize       = 0x11
	CmdGetInfo             = 0x12
	CmdLockStorage         = 0x13
)

// Capabilities is the CMD_GET_CAPABILITY bitmap: swtpm 0.7's set for TPM 2.0
// (PTM_CAP_INIT .. PTM_CAP_SEND_COMMAND_HEADER) plus PTM_CAP_LOCK_STORAGE.
const Capabilities uint64 = 1<<0 | 1<<1 | 1<<2 | 1<<3 | 1<<4 | 1<<5 | 1<<6 | 1<<7 |
	1<<8 | 1<<9 | 1<<10 | 1<<11 | 1<<12 | 1<<13 | 1<<14 | 1<<15 | 1<<16

// GET_CONFIG flags.
const (
	ConfigFlagFileKey      = 1
	ConfigFlagMigrationKey = 2
)

// Result codes swtpm's control channel uses.
const (
	rcSuccess      = 0
	rcBadParameter = 3
	rcFail         = 9
	rcBadOrdinal   = 10
	rcKeyNotFound  = 13
	rcIOError      = 31
	rcBadLocality  = 61
)

const (
	stateFlagEncrypted = 2
	getInfoMaxChunk    = 3 * 1024
	// maxControlBody bounds HASH_DATA and SET_STATEBLOB payloads.
	maxControlBody = 16 << 20
)

// ControlNeed returns the total length of the control message starting in b,
// as far as b tells (swtpm's ctrlchannel_recv_cmd): commands without a fixed
// body need only the 4-byte code, and their body is whatever came with it.
func ControlNeed(b []byte) int {
	if len(b) < 4 {
		return 4
	}
	switch binary.BigEndian.Uint32(b) {
	case CmdInit, CmdSetBufferSize, CmdLockStorage:
		return 8
	case CmdSetLocality, CmdResetTPMEstablished:
		return 5
	case CmdGetStateBlob:
		return 16
	case CmdGetInfo:
		return 20
	case CmdHashData:
		if len(b) < 8 {
			return 8
		}
		return 8 + int(min(binary.BigEndian.Uint32(b[4:]), maxControlBody))
	case CmdSetStateBlob:
		if len(b) < 16 {
			return 16
		}
		return 16 + int(min(binary.BigEndian.Uint32(b[12:]), maxControlBody))
	}
	return 4
}

// ServeControl serves the control channel on ln until ctx ends.
func (s *Server) ServeControl(ctx context.Context, ln net.Listener) error {
	return s.serve(ctx, ln, s.HandleControl)
}

// HandleControl serves control messages on c until EOF, error or
// CMD_SHUTDOWN. On a unix socket it accepts SCM_RIGHTS for CMD_SET_DATAFD.
func (s *Server) HandleControl(ctx context.Context, c net.Conn) {
	uc, _ := c.(*net.UnixConn)
	buf := make([]byte, 0, 8192)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	out := make([]byte, 0, 4096)
	for ctx.Err() == nil {
		passed := -1
		var n int
		var err error
		buf = buf[:cap(buf)]
		if uc != nil {
			var oobn int
			n, oobn, _, _, err = uc.ReadMsgUnix(buf, oob)
			if oobn > 0 {
				passed = takeFD(oob[:oobn])
			}
		} else {
			n, err = c.Read(buf)
		}
		if err != nil || n <= 0 {
			closeFD(passed)
			return
		}
		buf = buf[:n]
		// The rest of a message must follow within 500 ms, as in swtpm.
		for need := ControlNeed(buf); len(buf) < need; need = ControlNeed(buf) {
			if len(buf) == cap(buf) {
				// Grow as the bytes arrive, not to the length the header
				// declares: a 16-byte header must not reserve 16 MiB.
				nb := make([]byte, len(buf), min(need, max(2*cap(buf), 64<<10)))
				copy(nb, buf)
				buf = nb
			}
			c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			m, err := c.Read(buf[len(buf):min(need, cap(buf))])
			buf = buf[:len(buf)+m]
			if err != nil {
				break
			}
		}
		c.SetReadDeadline(time.Time{})
		var shutdown bool
		out, shutdown = s.Control(out[:0], buf, passed)
		if cap(buf) > 64<<10 {
			buf = make([]byte, 0, 8192) // a large message's buffer is not kept
		}
		if _, err := c.Write(out); err != nil {
			s.log.Debug("control channel write failed", "err", err)
			return
		}
		if shutdown {
			s.requestShutdown()
			return
		}
	}
}

func takeFD(oob []byte) int {
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return -1
	}
	fd := -1
	for _, m := range msgs {
		fds, err := syscall.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, f := range fds {
			if fd < 0 {
				fd = f
			} else {
				syscall.Close(f)
			}
		}
	}
	return fd
}

func closeFD(fd int) {
	if fd >= 0 {
		syscall.Close(fd)
	}
}

func appendRC(out []byte, rc uint32) []byte { return binary.BigEndian.AppendUint32(out, rc) }

// Control executes one control message (code and body) and appends the
// response to out. passedFD is a descriptor received with the message (or
// -1); Control owns it. shutdown reports CMD_SHUTDOWN.
func (s *Server) Control(out, msg []byte, passedFD int) (_ []byte, shutdown bool) {
	if len(msg) < 4 {
		closeFD(passedFD)
		return appendRC(out, rcBadParameter), false
	}
	cmd := binary.BigEndian.Uint32(msg)
	body := msg[4:]
	if cmd != CmdSetDataFD {
		closeFD(passedFD)
	}
	t := s.tpm
	bad := func() []byte { return appendRC(out, rcBadParameter) }
	notRunning := func() []byte { return appendRC(out, rcBadOrdinal) }

	switch cmd {
	case CmdGetCapability:
		return binary.BigEndian.AppendUint64(out, Capabilities), false
	case CmdInit:
		if len(body) != 4 {
			return bad(), false
		}
		return appendRC(out, t.Init(binary.BigEndian.Uint32(body))), false
	case CmdStop:
		if len(body) != 0 {
			return bad(), false
		}
		t.Stop()
		return appendRC(out, rcSuccess), false
	case CmdShutdown:
		if len(body) != 0 {
			return bad(), false
		}
		t.Stop()
		return appendRC(out, rcSuccess), true
	case CmdGetTPMEstablished:
		if !t.Running() {
			return notRunning(), false
		}
		if len(body) != 0 {
			return bad(), false
		}
		bit, rc := t.Established()
		out = appendRC(out, rc)
		var b byte
		if bit {
			b = 1
		}
		return append(out, b, 0, 0, 0), false
	case CmdResetTPMEstablished:
		if !t.Running() {
			return notRunning(), false
		}
		if len(body) < 1 {
			return bad(), false
		}
		if body[0] > 4 {
			return appendRC(out, rcBadLocality), false
		}
		return appendRC(out, t.ResetEstablished(body[0])), false
	case CmdSetLocality:
		if len(body) < 1 {
			return bad(), false
		}
		loc := body[0]
		if loc > 4 || (loc == 4 && s.opts.RejectLocality4) {
			return appendRC(out, rcBadLocality), false
		}
		return appendRC(out, t.SetLocality(loc)), false
	case CmdHashStart, CmdHashEnd, CmdCancelTPMCmd, CmdStoreVolatile:
		if !t.Running() {
			return notRunning(), false
		}
		if len(body) != 0 {
			return bad(), false
		}
		var rc uint32
		switch cmd {
		case CmdHashStart:
			rc = t.HashStart()
		case CmdHashEnd:
			rc = t.HashEnd()
		case CmdCancelTPMCmd:
			rc = t.Cancel()
		default:
			rc = t.StoreVolatile()
		}
		return appendRC(out, rc), false
	case CmdHashData:
		if !t.Running() {
			return notRunning(), false
		}
		if len(body) < 4 {
			return bad(), false
		}
		length := binary.BigEndian.Uint32(body)
		data := body[4:]
		if uint64(len(data)) < uint64(length) {
			return appendRC(out, rcIOError), false // the client stopped sending
		}
		return appendRC(out, t.HashData(data[:length])), false
	case CmdGetStateBlob:
		if !t.Running() {
			return notRunning(), false
		}
		if len(body) < 12 {
			return bad(), false
		}
		return s.getStateBlob(out, binary.BigEndian.Uint32(body[4:]), binary.BigEndian.Uint32(body[8:])), false
	case CmdSetStateBlob:
		if t.Running() {
			return notRunning(), false
		}
		if len(body) < 12 {
			return bad(), false
		}
		return appendRC(out, s.setStateBlob(binary.BigEndian.Uint32(body[4:]), binary.BigEndian.Uint32(body[8:]), body[12:])), false
	case CmdGetConfig:
		if len(body) != 0 {
			return bad(), false
		}
		var flags uint32
		if s.opts.FileKey {
			flags |= ConfigFlagFileKey
		}
		if s.opts.MigrationKey {
			flags |= ConfigFlagMigrationKey
		}
		return binary.BigEndian.AppendUint32(appendRC(out, rcSuccess), flags), false
	case CmdSetDataFD:
		return appendRC(out, s.setDataFD(passedFD)), false
	case CmdSetBufferSize:
		if len(body) < 4 {
			return bad(), false
		}
		size, lo, hi, err := t.SetBufferSize(binary.BigEndian.Uint32(body))
		if err != nil {
			return notRunning(), false
		}
		out = appendRC(out, rcSuccess)
		out = binary.BigEndian.AppendUint32(out, size)
		out = binary.BigEndian.AppendUint32(out, lo)
		return binary.BigEndian.AppendUint32(out, hi), false
	case CmdGetInfo:
		if len(body) < 16 {
			return bad(), false
		}
		info, err := t.Info(binary.BigEndian.Uint64(body))
		if err != nil {
			return appendRC(out, 23), false // TPM_SIZE, as swtpm on allocation failure
		}
		offset := binary.BigEndian.Uint32(body[8:])
		if uint64(offset) >= uint64(len(info)) {
			return bad(), false
		}
		total := len(info) + 1 // swtpm sends the terminating NUL
		chunk := min(total-int(offset), getInfoMaxChunk)
		out = appendRC(out, rcSuccess)
		out = binary.BigEndian.AppendUint32(out, uint32(total))
		out = binary.BigEndian.AppendUint32(out, uint32(chunk))
		withNUL := append([]byte(info), 0)
		return append(out, withNUL[offset:int(offset)+chunk]...), false
	case CmdLockStorage:
		if len(body) < 4 {
			return bad(), false
		}
		if s.opts.LockStorage == nil {
			return appendRC(out, rcFail), false
		}
		if err := s.opts.LockStorage(binary.BigEndian.Uint32(body)); err != nil {
			s.log.Error("locking the state storage failed", "err", err)
			return appendRC(out, rcFail), false
		}
		return appendRC(out, rcSuccess), false
	}
	s.log.Error("unknown control channel command", "cmd", cmd)
	return appendRC(out, rcBadOrdinal), false
}

func (s *Server) getStateBlob(out []byte, blobType, offset uint32) []byte {
	plain, rc := s.tpm.GetState(blobType)
	var blob []byte
	if rc == rcSuccess {
		var err error
		if blob, err = swtpmblob.Encode(plain, s.opts.Migration); err != nil {
			s.log.Error("encoding a state blob failed", "err", err)
			rc = rcFail
		}
	}
	var rest []byte
	if rc == rcSuccess && uint64(offset) < uint64(len(blob)) {
		rest = blob[offset:]
	}
	out = appendRC(out, rc)
	out = binary.BigEndian.AppendUint32(out, 0) // never encrypted with a state key
	out = binary.BigEndian.AppendUint32(out, uint32(len(rest)))
	out = binary.BigEndian.AppendUint32(out, uint32(len(rest)))
	return append(out, rest...)
}

func (s *Server) setStateBlob(blobType, length uint32, data []byte) uint32 {
	if blobType < 1 || blobType > 3 {
		s.log.Error("unknown state blob type", "type", blobType)
		return rcBadParameter
	}
	if uint64(len(data)) != uint64(length) {
		return rcBadParameter
	}
	if length == 0 {
		return s.tpm.SetState(blobType, nil)
	}
	plain, err := swtpmblob.Decode(data, s.opts.Migration)
	if err != nil {
		s.log.Error("refusing a state blob", "type", blobType, "err", err)
		if errors.Is(err, swtpmblob.ErrBlobNeedsKey) || errors.Is(err, swtpmblob.ErrBlobStateKeyed) {
			return rcKeyNotFound
		}
		return rcBadParameter
	}
	return s.tpm.SetState(blobType, plain)
}

// setDataFD adopts a data connection passed with SCM_RIGHTS (QEMU passes one
// end of a socketpair) and serves it until it closes.
func (s *Server) setDataFD(fd int) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dataFD != nil {
		closeFD(fd)
		return rcIOError
	}
	if fd < 0 {
		s.log.Error("CMD_SET_DATAFD without a descriptor in the message")
		return rcBadParameter
	}
	f := os.NewFile(uintptr(fd), "datafd")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		s.log.Error("CMD_SET_DATAFD: descriptor is not a socket", "err", err)
		return rcBadParameter
	}
	s.dataFD = c
	ctx, cancel := context.WithCancel(context.Background())
	s.dataCancel = cancel
	s.conns.Add(1)
	go func() {
		defer s.conns.Done()
		defer cancel()
		s.handleDataConn(ctx, c, false, true)
		c.Close()
		s.mu.Lock()
		s.dataFD = nil
		s.mu.Unlock()
		s.log.Info("data client disconnected")
	}()
	return rcSuccess
}

// CloseDataFD closes a connection adopted by CMD_SET_DATAFD, if any.
func (s *Server) CloseDataFD() {
	s.mu.Lock()
	if s.dataFD != nil {
		s.dataCancel()
		s.dataFD.Close()
	}
	s.mu.Unlock()
}
