package attestedlink

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/vtpm/tpmrpc"
)

// ClientConfig says who the client is and which backends it trusts.
type ClientConfig struct {
	// Certificate authenticates the client to the backend.
	Certificate tls.Certificate
	// Policy decides which evidence is acceptable: trusted HYGON roots,
	// measurements, policy bits. Required.
	Policy *csv.AppraisalPolicy
	// Certs supplies HSK/CEK by chip serial; nil uses the pair the backend
	// sends (which must still chain to a trusted root).
	Certs csv.CertSource
	// HandshakeTimeout bounds TLS handshake plus attestation; zero means
	// 30 seconds.
	HandshakeTimeout time.Duration
	// Workload, if set, proves that the client runs in a CSV workload VM:
	// after the backend is appraised, the client sends the workload's own
	// CSV report bound to this session (WorkloadReportData), with
	// WorkloadHSKCEK, its chip's HSK and CEK. An instance bound to its
	// workload serves only such sessions.
	Workload       csv.ReportProvider
	WorkloadHSKCEK []byte
}

// EvidenceError is a refusal of the backend's evidence. No TPM command
// has been sent when it is returned.
type EvidenceError struct {
	Reason string // a csv.Reason* code
	Err    error
}

func (e *EvidenceError) Error() string {
	var ae *csv.AppraisalError
	if errors.As(e.Err, &ae) {
		return "backend evidence refused: " + e.Err.Error() // names the reason itself
	}
	return "backend evidence refused (" + e.Reason + "): " + e.Err.Error()
}
func (e *EvidenceError) Unwrap() error { return e.Err }

// Session is an attested session with a backend. Calls are serialised.
// After any error the session is closed and every later call fails.
type Session struct {
	conn   *tls.Conn
	raw    net.Conn // under conn: a direct session goes on without TLS
	claims *csv.Claims

	mu  sync.Mutex
	f   *framer
	err error
}

// Dial runs the TLS handshake and the attestation over conn, which it
// owns from now on (closed on failure).
func Dial(ctx context.Context, conn net.Conn, cfg ClientConfig) (*Session, error) {
	s, err := dial(ctx, conn, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

func dial(ctx context.Context, raw net.Conn, cfg ClientConfig) (*Session, error) {
	if cfg.Policy == nil {
		return nil, errors.New("attested link: no appraisal policy configured")
	}
	// With the backend's own HSK+CEK, its chip serial is its own claim.
	if cfg.Certs == nil && (len(cfg.Policy.AllowChips) > 0 || len(cfg.Policy.DenyChips) > 0) {
		return nil, fmt.Errorf("attested link: %w", csv.ErrEvidenceCertsWithChipLists)
	}
	timeout := cfg.HandshakeTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	raw.SetDeadline(time.Now().Add(timeout))
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Now()) })
	defer stop()
	conn := tls.Client(raw, &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cfg.Certificate},
		// The server proves itself by CSV evidence bound to this session's
		// exporter, not by a certificate chain; see the package doc.
		InsecureSkipVerify: true,
		ServerName:         "cvtpm-backend",
	})
	if err := conn.HandshakeContext(ctx); err != nil {
		return nil, fmt.Errorf("attested link: TLS handshake: %w", err)
	}
	f := newFramer(conn)
	nonce := make([]byte, NonceSize)
	rand.Read(nonce)
	if err := f.write(frameHello, "", nonce); err != nil {
		return nil, fmt.Errorf("attested link: sending nonce: %w", err)
	}
	ev, err := f.read(frameEvidence)
	if err != nil {
		return nil, fmt.Errorf("attested link: reading evidence: %w", err)
	}
	report, hskcek, backendNonce, err := splitEvidence(ev.payload)
	if err != nil {
		return nil, fmt.Errorf("attested link: %w", err)
	}
	certs := cfg.Certs
	if certs == nil {
		hsk, cek, err := csv.ParseHSKCEK(hskcek)
		if err != nil {
			return nil, &EvidenceError{Reason: csv.ReasonEvidence, Err: fmt.Errorf("HSK/CEK sent by the backend: %w", err)}
		}
		certs = csv.StaticSource{HSK: hsk, CEK: cek}
	}
	state := conn.ConnectionState()
	exporter, err := state.ExportKeyingMaterial(ExporterLabel, nil, exporterSize)
	if err != nil {
		return nil, fmt.Errorf("attested link: TLS exporter: %w", err)
	}
	want := ReportData(exporter, nonce)
	v := csv.NewVerifier(csv.VerifierOptions{TrustedRoots: cfg.Policy.TrustedRoots(), Certs: certs})
	claims, err := cfg.Policy.VerifyAndAppraise(ctx, v, report, want[:])
	if err != nil {
		var ae *csv.AppraisalError
		if errors.As(err, &ae) {
			return nil, &EvidenceError{Reason: ae.Reason, Err: err}
		}
		return nil, &EvidenceError{Reason: csv.ReasonEvidence, Err: err}
	}
	if cfg.Workload != nil {
		if len(backendNonce) == 0 {
			return nil, fmt.Errorf("attested link: the backend sent no nonce for workload evidence")
		}
		rd := WorkloadReportData(exporter, backendNonce)
		wr, err := cfg.Workload.Report(ctx, rd[:])
		if err != nil {
			return nil, fmt.Errorf("attested link: the workload's CSV report: %w", err)
		}
		var lens [8]byte
		binary.BigEndian.PutUint32(lens[:4], uint32(len(wr)))
		binary.BigEndian.PutUint32(lens[4:], uint32(len(cfg.WorkloadHSKCEK)))
		if err := f.write(frameWorkload, "", lens[:4], wr, lens[4:], cfg.WorkloadHSKCEK); err != nil {
			return nil, fmt.Errorf("attested link: sending workload evidence: %w", err)
		}
	}
	raw.SetDeadline(time.Time{})
	return &Session{conn: conn, raw: raw, claims: claims, f: f}, nil
}

// splitEvidence splits len|report|len|HSK+CEK[|len|nonce].
func splitEvidence(b []byte) (report, hskcek, nonce []byte, err error) {
	next := func(what string) ([]byte, error) {
		if len(b) < 4 {
			return nil, fmt.Errorf("%w: evidence frame too short for the %s length", ErrProtocol, what)
		}
		n := binary.BigEndian.Uint32(b)
		if uint64(n)+4 > uint64(len(b)) {
			return nil, fmt.Errorf("%w: evidence %s length %d exceeds the frame", ErrProtocol, what, n)
		}
		v := b[4 : 4+n]
		b = b[4+n:]
		return v, nil
	}
	if report, err = next("report"); err != nil {
		return nil, nil, nil, err
	}
	if hskcek, err = next("HSK/CEK"); err != nil {
		return nil, nil, nil, err
	}
	if len(b) > 0 {
		if nonce, err = next("nonce"); err != nil {
			return nil, nil, nil, err
		}
	}
	if len(b) != 0 {
		return nil, nil, nil, fmt.Errorf("%w: %d stray bytes after the evidence", ErrProtocol, len(b))
	}
	return report, hskcek, nonce, nil
}

// Claims are the appraised CSV claims of the backend.
func (s *Session) Claims() *csv.Claims { return s.claims }

// Call sends one tpmrpc request for instance and returns the response,
// which is valid until the next call.
func (s *Session) Call(ctx context.Context, instance string, req []byte) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	resp, err := s.call(ctx, instance, req)
	if err != nil {
		s.err = fmt.Errorf("attested link session ended: %w", err)
		s.conn.Close()
		return nil, s.err
	}
	return resp, nil
}

func (s *Session) call(ctx context.Context, instance string, req []byte) ([]byte, error) {
	if dl, ok := ctx.Deadline(); ok {
		s.conn.SetDeadline(dl)
		defer s.conn.SetDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { s.conn.SetDeadline(time.Now()) })
	defer stop()
	if err := s.f.write(frameRequest, instance, req); err != nil {
		return nil, err
	}
	fr, err := s.f.read(frameResponse)
	if err != nil {
		return nil, err
	}
	if fr.instance != instance {
		return nil, fmt.Errorf("%w: response for instance %q, asked %q", ErrProtocol, fr.instance, instance)
	}
	return fr.payload, nil
}

// Close ends the session.
func (s *Session) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err == nil {
		s.err = errors.New("attested link session closed")
	}
	return s.conn.Close()
}

// InstanceCaller is a tpmrpc.Caller for one instance that (re)dials a
// session when it has none: after a session ends with an error, the call
// that saw the error fails (it may or may not have run) and the next call
// attests a new session.
type InstanceCaller struct {
	Instance string
	Dial     func(ctx context.Context) (*Session, error)

	mu      sync.Mutex
	session *Session
	closed  bool
}

// ErrCallerClosed is the error of a call after Close: a closed caller does
// not dial again.
var ErrCallerClosed = fmt.Errorf("attested link: the caller is closed: %w", net.ErrClosed)

// Call implements tpmrpc.Caller.
func (c *InstanceCaller) Call(ctx context.Context, req []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.connectLocked(ctx); err != nil {
		return nil, err
	}
	resp, err := c.session.Call(ctx, c.Instance, req)
	if err != nil {
		c.session = nil
	}
	return resp, err
}

// Close closes the current session; later calls fail with
// ErrCallerClosed instead of attesting a new one.
func (c *InstanceCaller) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.session != nil {
		err := c.session.Close()
		c.session = nil
		return err
	}
	return nil
}

// RemoteTPM is a swtpmproto.TPM (and go-tpm transport) for one instance on
// the backend that dial reaches; sessions are attested on first use and
// after a failure.
func RemoteTPM(instance string, dial func(ctx context.Context) (*Session, error), log *slog.Logger) (*tpmrpc.Client, *InstanceCaller) {
	caller := &InstanceCaller{Instance: instance, Dial: dial}
	return tpmrpc.NewClient(caller, tpmrpc.ClientOptions{Logger: log}), caller
}

// Connect attests a session now rather than at the first call, so a
// misconfigured or untrusted backend is reported at start-up.
func (c *InstanceCaller) Connect(ctx context.Context) (*Session, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connectLocked(ctx)
}

// connectLocked attests a session if there is none; c.mu is held.
func (c *InstanceCaller) connectLocked(ctx context.Context) (*Session, error) {
	if c.closed {
		return nil, ErrCallerClosed
	}
	if c.session == nil {
		s, err := c.Dial(ctx)
		if err != nil {
			return nil, err
		}
		c.session = s
	}
	return c.session, nil
}
