package sockmap

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// maxJoined bounds the pairs joined at once (the map's size); a relay
// copies the connections beyond it.
const maxJoined = 8192

// drainWait is how long a side's end waits for the kernel to send what it
// still holds for the other side (the redirect runs in a kernel worker)
// before that side is half-closed.
const drainWait = 20 * time.Millisecond

// Joiner joins connection pairs. One serves a whole relay.
type Joiner struct {
	hash *ebpf.Map
	prog *ebpf.Program
	mu   sync.Mutex
	n    int
}

// New loads the verdict program and its map.
func New() (*Joiner, error) {
	// key: the socket cookie of the socket that receives; value: the socket
	// its bytes are sent on.
	hash, err := ebpf.NewMap(&ebpf.MapSpec{Name: "cvtpm_relay", Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: 2 * maxJoined})
	if err != nil {
		return nil, fmt.Errorf("sockmap: creating the socket map (needs root and a kernel with sockmap): %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Name: "cvtpm_relay", Type: ebpf.SkSKB, License: "Dual MIT/GPL", Instructions: asm.Instructions{
		// key = bpf_get_socket_cookie(skb)
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
		// return bpf_sk_redirect_hash(skb, &hash, &key, 0): to the peer's
		// send queue (SK_DROP if the key is missing, which Join orders
		// against)
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, hash.FD()),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnSkRedirectHash.Call(),
		asm.Return(),
	}})
	if err != nil {
		hash.Close()
		return nil, fmt.Errorf("sockmap: loading the verdict program: %w", err)
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{Target: hash.FD(), Program: prog, Attach: ebpf.AttachSkSKBVerdict}); err != nil {
		prog.Close()
		hash.Close()
		return nil, fmt.Errorf("sockmap: attaching the verdict program: %w", err)
	}
	return &Joiner{hash: hash, prog: prog}, nil
}

// Close releases the map and the program; pairs still joined stop being
// forwarded.
func (j *Joiner) Close() error {
	j.prog.Close()
	return j.hash.Close()
}

type side struct {
	conn   net.Conn
	raw    syscall.RawConn
	fd     int
	cookie uint64
}

func sideOf(c net.Conn) (*side, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, ErrUnsupported
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, ErrUnsupported
	}
	s := &side{conn: c, raw: raw}
	var serr error
	raw.Control(func(fd uintptr) {
		s.fd = int(fd)
		proto, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
		if err != nil || proto != unix.IPPROTO_TCP {
			serr = ErrUnsupported
			return
		}
		if s.cookie, err = unix.GetsockoptUint64(s.fd, unix.SOL_SOCKET, unix.SO_COOKIE); err != nil {
			serr = ErrUnsupported
		}
	})
	return s, serr
}

// Join forwards between first and second in the kernel until either
// side ends, then closes both and returns. It must
// be called before any byte was forwarded, and second must not speak
// before first (a TLS server behind a relay does not): second joins
// first, and its bytes would be dropped in the moment before first
// joins. ErrUnsupported: nothing was read, copy instead.
func (j *Joiner) Join(ctx context.Context, first, second net.Conn) error {
	a, err := sideOf(first)
	if err != nil {
		return err
	}
	b, err := sideOf(second)
	if err != nil {
		return err
	}
	j.mu.Lock()
	if j.n >= maxJoined {
		j.mu.Unlock()
		return ErrUnsupported
	}
	j.n++
	j.mu.Unlock()
	defer func() {
		j.mu.Lock()
		j.n--
		j.mu.Unlock()
	}()
	// The value socket is the one that joins the map. second first: its
	// bytes go to first (key: second's cookie) only once first has joined.
	if err := j.hash.Update(a.cookie, uint64(b.fd), ebpf.UpdateNoExist); err != nil {
		return fmt.Errorf("%w: %v", ErrUnsupported, err)
	}
	if err := j.hash.Update(b.cookie, uint64(a.fd), ebpf.UpdateNoExist); err != nil {
		j.hash.Delete(a.cookie)
		return fmt.Errorf("%w: %v", ErrUnsupported, err)
	}
	defer j.hash.Delete(a.cookie)
	defer j.hash.Delete(b.cookie)
	// Bytes that arrived before first joined wait in its receive queue
	// until more come: setting SO_RCVLOWAT makes TCP signal them now, and
	// the verdict takes them in order.
	for _, s := range []*side{a, b} {
		unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1)
	}
	// A read returns only at the end of its side (the bytes go past it):
	// EOF, an error, or ctx.
	stop := context.AfterFunc(ctx, func() {
		first.SetReadDeadline(time.Now())
		second.SetReadDeadline(time.Now())
	})
	defer stop()
	// As the copying relay does, the pair ends when either side ends: a
	// side's end reaches the other (a half-close) after the kernel has had
	// drainWait to send what it still holds, then both close.
	ended := make(chan struct{}, 2)
	for _, d := range [][2]*side{{a, b}, {b, a}} {
		go func() {
			defer func() { ended <- struct{}{} }()
			var one [1]byte
			n, err := d[0].conn.Read(one[:])
			if n > 0 || (err != nil && !errors.Is(err, unix.EPIPE) && !isEOF(err)) {
				// Not forwarded (taken off the map, a deadline): end both.
				first.Close()
				second.Close()
				return
			}
			time.Sleep(drainWait)
			if cw, ok := d[1].conn.(interface{ CloseWrite() error }); ok {
				cw.CloseWrite()
			}
		}()
	}
	<-ended
	first.Close()
	second.Close()
	<-ended
	return nil
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed)
}
