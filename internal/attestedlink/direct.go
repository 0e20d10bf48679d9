package attestedlink

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/internal/directlink"
	"cvtpm/vtpm/tpmrpc"
)

// A direct session is an attested session that the backend hands, socket
// and keys, to the worker of the one instance it serves: the guest's TPM
// commands then reach libtpms without waking the supervisor. The client
// asks for it as its first request (frameDirect: the instance, and the
// cipher as payload); the server authorises it as it would a call,
// passes the socket on (DirectHandler) and confirms with frameDirectOK,
// the last TLS record of the session. From then on both ends speak
// internal/directlink records, keyed from this session's exporter.
const (
	frameDirect   = 7 // client -> server: hand this session to the instance's worker; payload: cipher name
	frameDirectOK = 8 // server -> client: the session is handed over; directlink records follow
)

// DirectHandler is a Handler that can take a session over. The link
// server calls HandOff once it has authorised the session for the
// instance; HandOff gives the socket and keys to whoever serves the
// instance, calls Accept (which sends frameDirectOK) once they hold
// them, and returns. The server then closes its copy of the socket.
type DirectHandler interface {
	HandOff(ctx context.Context, h *DirectHandoff) error
}

// DirectHandoff is one session being handed over.
type DirectHandoff struct {
	Instance string
	// Caps are what the Authorizer granted the session.
	Caps tpmrpc.Capabilities
	Keys directlink.Keys
	// Conn is the session's socket (a syscall.Conn).
	Conn net.Conn
	// Accept tells the client that its session is handed over.
	Accept func() error
	// Reauthorize asks the Authorizer again, for revocation: ACL
	// reloads, CRL updates, bindings and deletions must reach sessions
	// the supervisor no longer sees.
	Reauthorize func(ctx context.Context) (tpmrpc.Capabilities, error)
	// Client is the session's client identity, for the log.
	Client string
}

// handOff serves a frameDirect request: the session's last act on the
// server.
func (s *Server) handOff(ctx context.Context, raw net.Conn, f *framer, peer *Peer, export directlink.Exporter, req frame) error {
	refuse := func(err error) error {
		f.write(frameError, req.instance, []byte(err.Error()))
		return err
	}
	dh, ok := s.Handler.(DirectHandler)
	if !ok {
		return refuse(errors.New("this backend does not hand sessions to instances"))
	}
	if f.r.Buffered() != 0 {
		return refuse(fmt.Errorf("%w: bytes after the request for a direct session", ErrProtocol))
	}
	caps, err := s.Authorizer.Authorize(ctx, peer, req.instance)
	if err != nil {
		return refuse(fmt.Errorf("client %q may not use instance %q: %v", peer.Certificate.Subject.CommonName, req.instance, err))
	}
	keys, err := directlink.ExportKeys(export, req.instance, string(req.payload))
	if err != nil {
		return refuse(err)
	}
	defer keys.Wipe()
	instance := req.instance
	err = dh.HandOff(ctx, &DirectHandoff{
		Instance: instance, Caps: caps, Keys: keys, Conn: raw, Client: peer.Certificate.Subject.CommonName,
		Accept: func() error { return f.write(frameDirectOK, instance) },
		Reauthorize: func(ctx context.Context) (tpmrpc.Capabilities, error) {
			return s.Authorizer.Authorize(ctx, peer, instance)
		},
	})
	if err != nil {
		return refuse(fmt.Errorf("instance %q: no direct session: %w", instance, err))
	}
	return nil
}

// Direct hands this session to the worker of instance, which then serves
// it with the cipher named (gcm.AES256 or gcm.SM4). The Session is used
// up either way; on a refusal the backend's reason is in the error.
func (s *Session) Direct(ctx context.Context, instance, cipher string) (*DirectSession, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	s.err = errors.New("attested link session handed over to a direct session")
	d, err := s.direct(ctx, instance, cipher)
	if err != nil {
		s.raw.Close()
		return nil, fmt.Errorf("attested link: direct session: %w", err)
	}
	return d, nil
}

func (s *Session) direct(ctx context.Context, instance, cipher string) (*DirectSession, error) {
	if dl, ok := ctx.Deadline(); ok {
		s.raw.SetDeadline(dl)
		defer s.raw.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { s.raw.SetDeadline(time.Now()) })
	defer stop()
	if err := s.f.write(frameDirect, instance, []byte(cipher)); err != nil {
		return nil, err
	}
	fr, err := s.f.read(frameDirectOK)
	if err != nil {
		return nil, err
	}
	if fr.instance != instance || s.f.r.Buffered() != 0 {
		return nil, fmt.Errorf("%w: a direct session confirmed for %q, with %d bytes after it", ErrProtocol, fr.instance, s.f.r.Buffered())
	}
	state := s.conn.ConnectionState()
	keys, err := directlink.ExportKeys(state.ExportKeyingMaterial, instance, cipher)
	if err != nil {
		return nil, err
	}
	defer keys.Wipe()
	d := &DirectSession{raw: s.raw}
	if d.seal, err = directlink.NewSealer(cipher, keys.ClientToServer); err != nil {
		return nil, err
	}
	if d.open, err = directlink.NewOpener(cipher, keys.ServerToClient); err != nil {
		return nil, err
	}
	return d, nil
}

// DirectSession carries one instance's calls to its worker. Calls are
// serialised; after an error the session is closed.
type DirectSession struct {
	raw  net.Conn
	mu   sync.Mutex
	seal *directlink.Sealer
	open *directlink.Opener
	out  []byte
	in   []byte
	err  error
}

// Call sends one tpmrpc request and returns the response, valid until the
// next call.
func (d *DirectSession) Call(ctx context.Context, req []byte) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err != nil {
		return nil, d.err
	}
	resp, err := d.call(ctx, req)
	if err != nil {
		d.err = fmt.Errorf("direct session ended: %w", err)
		d.raw.Close()
		return nil, d.err
	}
	return resp, nil
}

func (d *DirectSession) call(ctx context.Context, req []byte) ([]byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		d.raw.SetDeadline(dl)
		defer d.raw.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { d.raw.SetDeadline(time.Now()) })
	defer stop()
	var err error
	if d.out, err = d.seal.Seal(d.out[:0], req); err != nil {
		return nil, err
	}
	if _, err := d.raw.Write(d.out); err != nil {
		return nil, err
	}
	rec, err := directlink.ReadRecord(d.raw, d.in)
	if err != nil {
		return nil, err
	}
	d.in = rec[:0]
	return d.open.Open(rec)
}

// ended reports whether the worker has already closed the session (it
// never sends unasked): a call is then better sent on a new one than
// lost on this.
func (d *DirectSession) ended() bool {
	sc, ok := d.raw.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return true
	}
	gone := false
	rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
		if n, err := unix.Poll(p, 0); err == nil && n > 0 {
			gone = true
		}
	})
	return gone
}

// Close ends the session.
func (d *DirectSession) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = errors.New("direct session closed")
	}
	return d.raw.Close()
}

// DirectCaller is a tpmrpc.Caller for one instance that sends the
// instance's ordinary TPM commands through a direct session with its
// worker (tpmrpc.DirectEligible) and everything else through Supervisor.
// A backend that refuses a direct session (one that predates them, an
// instance it will not hand over) is asked again after directRetry; until
// then every call goes through the supervisor.
type DirectCaller struct {
	Supervisor *InstanceCaller
	// Dial attests a new session for the direct one.
	Dial   func(ctx context.Context) (*Session, error)
	Cipher string
	Logger *slog.Logger

	mu       sync.Mutex
	direct   *DirectSession
	retryAt  time.Time
	refusals int
	closed   bool
}

// directRetry is how long a refused direct session is not asked for again.
const directRetry = 30 * time.Second

// Call implements tpmrpc.Caller.
func (c *DirectCaller) Call(ctx context.Context, req []byte) ([]byte, error) {
	r, err := tpmrpc.ParseRequest(req)
	if err != nil || tpmrpc.DirectEligible(r) != nil {
		return c.Supervisor.Call(ctx, req)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, ErrCallerClosed
	}
	for try := 0; ; try++ {
		if c.direct != nil && c.direct.ended() {
			// Ended by the worker between calls (a VM reset, a revocation,
			// a restart): this call was never sent, so it goes on a new one.
			c.direct.Close()
			c.direct = nil
		}
		if c.direct == nil && !time.Now().Before(c.retryAt) {
			if c.direct, err = c.dialDirect(ctx); err != nil {
				c.retryAt = time.Now().Add(directRetry)
				if c.Logger != nil {
					// Once at warning level: a backend may refuse for good
					// (the host path of an instance bound with host "boot").
					level := slog.LevelWarn
					if c.refusals++; c.refusals > 1 {
						level = slog.LevelDebug
					}
					c.Logger.Log(ctx, level, "no direct session with the instance's worker: commands go through the backend's supervisor", "instance", c.Supervisor.Instance, "err", err, "retry_in", directRetry)
				}
			}
		}
		if c.direct == nil {
			return c.Supervisor.Call(ctx, req)
		}
		resp, err := c.direct.Call(ctx, req)
		if err == nil {
			return resp, nil
		}
		c.direct = nil
		if !errors.Is(err, directlink.ErrEnded) || try > 0 {
			// Not sent again: it may have run.
			return nil, err
		}
		// The worker said, sealed, that it ended the session without
		// running the call: sent once more, on a new session.
	}
}

func (c *DirectCaller) dialDirect(ctx context.Context) (*DirectSession, error) {
	s, err := c.Dial(ctx)
	if err != nil {
		return nil, err
	}
	return s.Direct(ctx, c.Supervisor.Instance, c.Cipher)
}

// Close ends both sessions; later calls fail with ErrCallerClosed.
func (c *DirectCaller) Close() error {
	c.mu.Lock()
	c.closed = true
	if c.direct != nil {
		c.direct.Close()
		c.direct = nil
	}
	c.mu.Unlock()
	return c.Supervisor.Close()
}

// RemoteTPMDirect is RemoteTPM with the instance's ordinary TPM commands
// sent through a direct session with its worker, sealed with cipher. The
// DirectCaller's Supervisor is the session everything else goes through.
func RemoteTPMDirect(instance, cipher string, dial func(ctx context.Context) (*Session, error), log *slog.Logger) (*tpmrpc.Client, *DirectCaller) {
	sup := &InstanceCaller{Instance: instance, Dial: dial}
	caller := &DirectCaller{Supervisor: sup, Dial: dial, Cipher: cipher, Logger: log}
	return tpmrpc.NewClient(caller, tpmrpc.ClientOptions{Logger: log}), caller
}
