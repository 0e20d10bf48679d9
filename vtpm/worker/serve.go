package worker

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"cvtpm/internal/directlink"
	"cvtpm/vtpm/swtpmproto"
	"cvtpm/vtpm/tpmrpc"
)

// maxDirect bounds the direct sessions one worker serves at once (a guest
// proxy holds one); the supervisor keeps every other session on itself.
const maxDirect = 8

// directWriteTimeout ends a direct session whose client does not take its
// answer: the worker serves one call at a time, and a client that stops
// reading must not hold up the supervisor's calls.
const directWriteTimeout = time.Second

// server answers the supervisor's calls on its socket and, between them,
// the calls of the direct sessions it was given (internal/directlink):
// one thread waits in ppoll on all of them, so a command from either
// wakes the worker once, and libtpms is only ever called from here.
type server struct {
	tpm swtpmproto.TPM
	// locality is the TPM's current locality, which direct calls are
	// checked at (as the supervisor checks its callers').
	locality func() uint8
	sup      int      // the supervisor's socket (blocking)
	supFile  *os.File // the same, to write to
	log      *slog.Logger

	sessions   []*direct
	leaseUntil time.Time
	// refusals are the calls refused since the last OpDirectSync, which
	// reports them to the supervisor (one entry per session), with the
	// calls answered and the time they took.
	refusals []tpmrpc.DirectRefusal
	calls    uint32
	busy     time.Duration
	pending  []int // descriptors received and not yet attached
	in, out  []byte
	rec      []byte // a sealed answer
	oob      []byte
	hdr      unix.Msghdr
	iov      unix.Iovec
}

// direct is one direct session: a guest's attested link session that the
// supervisor handed over after authorising it.
type direct struct {
	id     uint64
	fd     int // non-blocking
	caps   tpmrpc.Capabilities
	open   *directlink.Opener
	seal   *directlink.Sealer
	buf    []byte // received bytes not yet a whole record
	closed bool
}

func newServer(tpm swtpmproto.TPM, locality func() uint8, sup *os.File, log *slog.Logger) *server {
	return &server{tpm: tpm, locality: locality, sup: int(sup.Fd()), supFile: sup, log: log, oob: make([]byte, unix.CmsgSpace(4*4))}
}

// run serves until the supervisor closes its end (nil) or the socket
// fails. The supervisor comes first, and a direct session gets one call
// per round: a client that pipelines its records must not hold the
// supervisor's calls (a host reset, a revocation, the lease) off, nor
// the other sessions.
func (s *server) run() error {
	var pfds []unix.PollFd
	zero := unix.NsecToTimespec(0)
	for {
		pfds = append(pfds[:0], unix.PollFd{Fd: int32(s.sup), Events: unix.POLLIN})
		var timeout *unix.Timespec
		for _, d := range s.sessions {
			pfds = append(pfds, unix.PollFd{Fd: int32(d.fd), Events: unix.POLLIN})
			if d.whole() {
				timeout = &zero // a call is waiting already
			}
		}
		if _, err := unix.Ppoll(pfds, timeout, nil); err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("waiting for calls: %w", err)
		}
		if pfds[0].Revents != 0 {
			if err := s.serveSupervisor(); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return err
			}
		}
		// Only the sessions polled: the supervisor may just have attached
		// another.
		for i, d := range s.sessions[:len(pfds)-1] {
			if !d.closed && (pfds[i+1].Revents != 0 || d.whole()) {
				s.serveDirect(d)
			}
		}
		s.sessions = slices.DeleteFunc(s.sessions, func(d *direct) bool { return d.closed })
	}
}

// Read reads the supervisor's socket, keeping the descriptors that come
// with the bytes (OpDirectAttach) for the call that names them. recvmsg
// is called with a header kept in s: x/sys's Recvmsg allocates per call,
// and an idle worker keeps every heap page its calls ever touched.
func (s *server) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		s.iov.Base = &p[0]
		s.iov.SetLen(len(p))
		s.hdr = unix.Msghdr{Iov: &s.iov, Control: &s.oob[0]}
		s.hdr.SetIovlen(1)
		s.hdr.SetControllen(len(s.oob))
		r, _, e := unix.Syscall(unix.SYS_RECVMSG, uintptr(s.sup), uintptr(unsafe.Pointer(&s.hdr)), unix.MSG_CMSG_CLOEXEC)
		s.iov.Base = nil
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		if oobn := int(s.hdr.Controllen); oobn > 0 {
			if msgs, err := unix.ParseSocketControlMessage(s.oob[:oobn]); err == nil {
				for _, m := range msgs {
					if fds, err := unix.ParseUnixRights(&m); err == nil {
						s.pending = append(s.pending, fds...)
					}
				}
			}
			if s.hdr.Flags&unix.MSG_CTRUNC != 0 {
				return 0, errors.New("descriptors from the supervisor were truncated")
			}
		}
		if r == 0 {
			return 0, io.EOF
		}
		return int(r), nil
	}
}

// serveSupervisor answers one call of the supervisor.
func (s *server) serveSupervisor() error {
	msg, err := tpmrpc.ReadMessage(s, s.in)
	if err != nil {
		return err
	}
	s.in = msg[:0]
	s.out = append(s.out[:0], 0, 0, 0, 0)
	op := tpmrpc.Op(0)
	if len(msg) > 0 {
		op = tpmrpc.Op(msg[0])
	}
	switch op {
	case tpmrpc.OpDirectAttach:
		s.out = tpmrpc.AppendResponse(s.out, s.attach(msg))
		clear(msg) // the session's keys
	case tpmrpc.OpDirectSync:
		s.out = tpmrpc.AppendResponse(s.out, s.sync(msg))
	case tpmrpc.OpInit, tpmrpc.OpStop, tpmrpc.OpGetState, tpmrpc.OpSetState:
		// A reset or a state transfer ends the direct sessions before it
		// runs, in this one thread: no guest command runs on the TPM the
		// host just reset (a workload that locked the host path must be
		// told, which the supervisor does when its client reconnects), or
		// on state that is leaving.
		s.endAll(op.String())
		fallthrough
	default:
		s.out = tpmrpc.Handle(s.tpm, msg, s.out)
	}
	s.closePending()
	binary.BigEndian.PutUint32(s.out, uint32(len(s.out)-4))
	_, err = s.supFile.Write(s.out) // blocking: whole, through interruptions
	return err
}

func (s *server) closePending() {
	for _, fd := range s.pending {
		unix.Close(fd)
	}
	s.pending = s.pending[:0]
}

// attach takes the direct session the supervisor hands over.
func (s *server) attach(msg []byte) tpmrpc.Response {
	r, err := tpmrpc.ParseRequest(msg)
	if err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	if len(s.pending) != 1 {
		return tpmrpc.Response{Err: fmt.Sprintf("a direct session comes with one socket, not %d", len(s.pending))}
	}
	if n := s.open(); n >= maxDirect {
		return tpmrpc.Response{Err: fmt.Sprintf("this instance already serves %d direct sessions", n)}
	}
	g, err := tpmrpc.ParseDirectGrant(r.Payload)
	if err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	defer g.Keys.Wipe()
	d := &direct{id: r.Arg, caps: g.Caps}
	if d.open, err = directlink.NewOpener(g.Keys.Cipher, g.Keys.ClientToServer); err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	if d.seal, err = directlink.NewSealer(g.Keys.Cipher, g.Keys.ServerToClient); err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	if err := unix.SetNonblock(s.pending[0], true); err != nil {
		return tpmrpc.Response{Err: fmt.Sprintf("direct session socket: %v", err)}
	}
	d.fd = s.pending[0]
	s.pending = s.pending[:0]
	s.leaseUntil = time.Now().Add(g.Lease)
	s.sessions = append(s.sessions, d)
	return tpmrpc.Response{}
}

func (s *server) open() int {
	n := 0
	for _, d := range s.sessions {
		if !d.closed {
			n++
		}
	}
	return n
}

// sync renews the lease, ends the sessions named, and lists those open.
func (s *server) sync(msg []byte) tpmrpc.Response {
	r, err := tpmrpc.ParseRequest(msg)
	if err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	lease, end, err := tpmrpc.ParseDirectSync(r.Payload)
	if err != nil {
		return tpmrpc.Response{Err: err.Error()}
	}
	s.leaseUntil = time.Now().Add(lease)
	reply := tpmrpc.DirectSyncReply{Calls: s.calls, Busy: s.busy, Refusals: s.refusals}
	s.calls, s.busy = 0, 0
	for _, d := range s.sessions {
		if slices.Contains(end, d.id) {
			s.end(d, "ended by the supervisor")
		}
		if !d.closed {
			reply.Open = append(reply.Open, d.id)
		}
	}
	s.refusals = nil
	return tpmrpc.Response{Payload: tpmrpc.AppendDirectSyncReply(nil, reply)}
}

// refuse answers a direct call that the session's capabilities do not
// allow, and keeps the refusal for the supervisor to count and log at the
// next sync, as it counts its own callers' (cvtpm_backend_calls_refused_total
// counts refusals for the caller's rights, not malformed or misrouted calls).
func (s *server) refuse(d *direct, why string, dst []byte) []byte {
	i := slices.IndexFunc(s.refusals, func(r tpmrpc.DirectRefusal) bool { return r.Session == d.id })
	if i < 0 {
		s.refusals = append(s.refusals, tpmrpc.DirectRefusal{Session: d.id})
		i = len(s.refusals) - 1
	}
	s.refusals[i].Calls++
	s.refusals[i].Reason = why
	return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: why})
}

func (s *server) endAll(why string) {
	for _, d := range s.sessions {
		s.end(d, why)
	}
}

func (s *server) end(d *direct, why string) {
	if d.closed {
		return
	}
	// Told, sealed, before the socket closes (directlink.AppendEnd): a
	// command the client sends meanwhile was not run, and it may send it
	// again on a new session. One attempt, without waiting.
	if rec, err := directlink.AppendEnd(d.seal, s.rec[:0]); err == nil {
		unix.Write(d.fd, rec)
		s.rec = rec[:0]
	}
	s.closeDirect(d, why)
}

// closeDirect closes d without telling its client (which is gone).
func (s *server) closeDirect(d *direct, why string) {
	if d.closed {
		return
	}
	d.closed = true
	unix.Close(d.fd)
	clear(d.buf)
	d.buf = nil
	s.log.Debug("direct session ended", "session", d.id, "why", why)
}

// whole reports whether d holds a whole record already received.
func (d *direct) whole() bool {
	if d.closed {
		return false
	}
	_, _, ok, err := directlink.Split(d.buf)
	return ok || err != nil
}

// serveDirect answers one record of a direct session, reading once if it
// holds none whole. Anything that does not open ends the session: the
// host relays these bytes and may alter them.
func (s *server) serveDirect(d *direct) {
	if !d.whole() {
		if len(d.buf) == cap(d.buf) {
			d.buf = slices.Grow(d.buf, 4096)
		}
		n, err := unix.Read(d.fd, d.buf[len(d.buf):cap(d.buf)])
		if err == unix.EINTR || err == unix.EAGAIN {
			return
		}
		if err != nil || n == 0 {
			s.closeDirect(d, "the client closed it")
			return
		}
		d.buf = d.buf[:len(d.buf)+n]
	}
	rec, rest, ok, err := directlink.Split(d.buf)
	if err != nil {
		s.end(d, err.Error())
		return
	}
	if !ok {
		return
	}
	start := time.Now()
	msg, err := d.open.Open(rec)
	if err != nil {
		s.end(d, err.Error())
		return
	}
	defer func() { s.calls, s.busy = s.calls+1, s.busy+time.Since(start) }()
	s.out = s.directCall(d, msg, s.out[:0], start)
	clear(rec)
	d.buf = d.buf[:copy(d.buf, rest)]
	s.rec, err = d.seal.Seal(s.rec[:0], s.out)
	clear(s.out)
	if err != nil {
		// The call ran: the client must not be told it did not.
		s.closeDirect(d, err.Error())
		return
	}
	s.writeDirect(d, s.rec)
}

// directCall performs one call of a direct session, or refuses it with
// the reason, and appends the encoded response to dst; now is when its
// record was taken up (the lease is checked against it).
func (s *server) directCall(d *direct, msg, dst []byte, now time.Time) []byte {
	r, err := tpmrpc.ParseRequest(msg)
	if err != nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: err.Error()})
	}
	if err := tpmrpc.DirectEligible(r); err != nil {
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: err.Error() + ": send it through the backend's supervisor"})
	}
	if now.After(s.leaseUntil) {
		// The supervisor renews the lease while the key broker records
		// this backend's state; it refuses its own callers in the same
		// case, with the same words.
		return tpmrpc.AppendResponse(dst, tpmrpc.Response{Err: "the key broker has not recorded this backend's state recently (unreachable, or another CVM runs as this backend): refusing to serve until it does"})
	}
	// Checked at the locality the last set-locality left, perhaps the
	// host's, exactly as the supervisor checks a plain Execute.
	checked := tpmrpc.Request{Op: tpmrpc.OpExecute, Locality: s.locality(), Arg: tpmrpc.ExecuteAtLocality, Payload: r.Payload}
	if err := d.caps.Allow(checked); err != nil {
		return s.refuse(d, fmt.Sprintf("refused: %v", err), dst)
	}
	return tpmrpc.Handle(s.tpm, msg, dst)
}

// writeDirect sends rec to a direct session, waiting at most
// directWriteTimeout for a client that does not read.
func (s *server) writeDirect(d *direct, rec []byte) {
	var deadline time.Time // from the first write that would block
	for len(rec) > 0 {
		n, err := unix.Write(d.fd, rec)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			if deadline.IsZero() {
				deadline = time.Now().Add(directWriteTimeout)
			}
			left := time.Until(deadline)
			if left <= 0 {
				s.closeDirect(d, "the client does not take its answers")
				return
			}
			ts := unix.NsecToTimespec(left.Nanoseconds())
			unix.Ppoll([]unix.PollFd{{Fd: int32(d.fd), Events: unix.POLLOUT}}, &ts, nil)
			continue
		case err != nil:
			s.closeDirect(d, err.Error())
			return
		}
		rec = rec[n:]
	}
}
