package attestedlink

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/internal/logfield"
	"cvtpm/internal/netaddr"
	"cvtpm/vtpm/tpmrpc"
)

// Handler performs one call (a vtpm/tpmrpc request) on an instance, if
// caps (what the Authorizer granted this client) permit it, and appends
// the encoded response to dst. Failures and refusals of the call itself
// belong in the response; an error return ends the session.
type Handler interface {
	Call(ctx context.Context, instance string, caps tpmrpc.Capabilities, req, dst []byte) ([]byte, error)
}

// Authorizer decides whether the client may use the instance, and with
// which capabilities. It is asked before the first call to each instance.
type Authorizer interface {
	Authorize(ctx context.Context, client *Peer, instance string) (tpmrpc.Capabilities, error)
}

// Peer is what the server knows of a session's client.
type Peer struct {
	// Certificate is the client's verified TLS certificate.
	Certificate *x509.Certificate
	// Workload is the client's own CSV evidence, if it sent any (a guest
	// proxy in a CSV workload VM). It is not verified here: whoever
	// authorises an instance bound to a workload checks it against that
	// instance's workload policy.
	Workload *WorkloadEvidence
	// Checked is the Authorizer's memo for this session (e.g. workload
	// evidence already verified against a binding): Authorize runs on
	// every call.
	Checked map[string]error
}

// WorkloadEvidence is a workload VM's CSV report for this session.
type WorkloadEvidence struct {
	Report, HSKCEK []byte
	// ReportData is what the report must carry (WorkloadReportData).
	ReportData [64]byte
}

// Server is the backend end of the link.
type Server struct {
	// TLS must hold the server's certificate and ClientCAs, the roots that
	// client certificates must chain to. Server forces TLS 1.3 and
	// RequireAndVerifyClientCert.
	TLS *tls.Config
	// Evidence produces the CSV report for a session (device or simulator).
	Evidence csv.ReportProvider
	// HSKCEK, if set, is sent with every report (csv.MarshalHSKCEK), so
	// clients need no key distribution server of their own.
	HSKCEK     []byte
	Authorizer Authorizer
	Handler    Handler
	Logger     *slog.Logger
	// HandshakeTimeout bounds TLS handshake plus attestation; zero means
	// 30 seconds.
	HandshakeTimeout time.Duration
	// MaxConns bounds the connections held at once (default 4096),
	// MaxPerClient the sessions of one client identity (certificate
	// common name; default 256): beyond them a connection is closed and
	// logged, so one client (or an unauthenticated flood, which the
	// handshake timeout also cuts) cannot take what the others need.
	MaxConns, MaxPerClient int

	errorLog                       logfield.Limiter // session error lines per source address
	sessionLog                     logfield.Limiter // session lines per client identity
	limitsOnce                     sync.Once
	connLimits, perClient, pending *netaddr.Limits
}

func (s *Server) limits() (conns, perClient *netaddr.Limits) {
	s.limitsOnce.Do(func() {
		max, per := s.MaxConns, s.MaxPerClient
		if max <= 0 {
			max = 4096
		}
		if per <= 0 {
			per = 256
		}
		s.connLimits = &netaddr.Limits{Max: max, Name: "attested link", Log: s.log()}
		s.perClient = &netaddr.Limits{MaxPerSource: per, Name: "attested link sessions per client identity", Log: s.log()}
		// Before its handshake a connection has no identity, only an
		// address: one address may have 64 handshakes under way, so an
		// unauthenticated flood cannot hold every slot for the 30 s a
		// handshake may take.
		s.pending = &netaddr.Limits{MaxPerSource: 64, Name: "attested link handshakes per source", Log: s.log()}
	})
	return s.connLimits, s.perClient
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

func (s *Server) tlsConfig() (*tls.Config, error) {
	if s.TLS == nil || len(s.TLS.Certificates) == 0 && s.TLS.GetCertificate == nil {
		return nil, errors.New("attested link server: no TLS certificate")
	}
	if s.TLS.ClientCAs == nil {
		return nil, errors.New("attested link server: no client CA: clients must be authenticated")
	}
	cfg := s.TLS.Clone()
	cfg.MinVersion = tls.VersionTLS13
	cfg.ClientAuth = tls.RequireAndVerifyClientCert
	// Sessions are not resumed; and no ticket may follow the records a
	// direct session's hand-off ends TLS with.
	cfg.SessionTicketsDisabled = true
	return cfg, nil
}

// Serve accepts sessions on ln until ctx ends or ln fails.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if _, err := s.tlsConfig(); err != nil {
		return err
	}
	if s.Evidence == nil || s.Authorizer == nil || s.Handler == nil {
		return errors.New("attested link server: Evidence, Authorizer and Handler are required")
	}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	conns, _ := s.limits()
	ln = conns.Listen(ln)
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("attested link: accept: %w", err)
		}
		src := netaddr.Source(conn)
		if !s.pending.Admit(src) {
			conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			handshaken := sync.OnceFunc(func() { s.pending.Release(src) })
			defer handshaken()
			if err := s.serveConn(ctx, conn, handshaken); err != nil {
				if ok, held := s.errorLog.Allow(netaddr.Source(conn)); ok {
					s.log().Warn("attested link session ended with an error", "remote", conn.RemoteAddr().String(), "err", err,
						"similar_lines_suppressed", held)
				}
			}
		}()
	}
}

// ServeConn runs one session on raw and closes it.
func (s *Server) ServeConn(ctx context.Context, raw net.Conn) error {
	return s.serveConn(ctx, raw, func() {})
}

// serveConn is ServeConn, calling handshaken once the TLS handshake is
// done (or has failed).
func (s *Server) serveConn(ctx context.Context, raw net.Conn, handshaken func()) error {
	defer raw.Close()
	cfg, err := s.tlsConfig()
	if err != nil {
		return err
	}
	timeout := s.HandshakeTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	raw.SetDeadline(time.Now().Add(timeout))
	conn := tls.Server(raw, cfg)
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Now()) })
	defer stop()
	hctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err = conn.HandshakeContext(hctx)
	handshaken()
	if err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	state := conn.ConnectionState()
	client := state.PeerCertificates[0]
	_, perClient := s.limits()
	if !perClient.Admit(client.Subject.CommonName) {
		return nil // logged by Admit (rate-limited)
	}
	defer perClient.Release(client.Subject.CommonName)
	log := s.log().With("client", client.Subject.CommonName, "remote", raw.RemoteAddr().String())
	f := newFramer(conn)

	// Attestation: the client's nonce, then our report bound to this
	// session's exporter.
	hello, err := f.read(frameHello)
	if err != nil {
		return fmt.Errorf("reading hello: %w", err)
	}
	if len(hello.payload) != NonceSize {
		f.write(frameError, "", []byte("hello must carry a 32-byte nonce"))
		return fmt.Errorf("%w: hello nonce is %d bytes", ErrProtocol, len(hello.payload))
	}
	exporter, err := state.ExportKeyingMaterial(ExporterLabel, nil, exporterSize)
	if err != nil {
		return fmt.Errorf("TLS exporter: %w", err)
	}
	rd := ReportData(exporter, hello.payload)
	report, err := s.Evidence.Report(hctx, rd[:])
	if err != nil {
		f.write(frameError, "", []byte("backend could not produce evidence"))
		return fmt.Errorf("CSV report: %w", err)
	}
	backendNonce := make([]byte, NonceSize)
	rand.Read(backendNonce)
	var lens [12]byte
	binary.BigEndian.PutUint32(lens[:4], uint32(len(report)))
	binary.BigEndian.PutUint32(lens[4:8], uint32(len(s.HSKCEK)))
	binary.BigEndian.PutUint32(lens[8:], NonceSize)
	if err := f.write(frameEvidence, "", lens[:4], report, lens[4:8], s.HSKCEK, lens[8:], backendNonce); err != nil {
		return fmt.Errorf("sending evidence: %w", err)
	}
	peer := &Peer{Certificate: client, Checked: map[string]error{}}
	raw.SetDeadline(time.Time{})
	// Sessions are logged within a rate per client identity: a client
	// that opens and closes them in a loop must not fill the log.
	quiet := true
	if ok, held := s.sessionLog.Allow(client.Subject.CommonName); ok {
		quiet = false
		log.Info("attested link session open", "sessions_not_logged_before", held)
	}

	authorized := map[string]tpmrpc.Capabilities{}
	var out []byte
	for first := true; ; first = false {
		req, err := f.read(frameRequest, frameWorkload, frameDirect)
		if err == nil && req.typ == frameDirect {
			if len(authorized) > 0 {
				f.write(frameError, "", []byte("a direct session must be asked for before any request"))
				return fmt.Errorf("%w: direct session asked for after a request", ErrProtocol)
			}
			if err := s.handOff(ctx, raw, f, peer, state.ExportKeyingMaterial, req); err != nil {
				return err
			}
			if !quiet {
				log.Info("attested link session handed to the instance's worker", "instance", req.instance)
			}
			return nil
		}
		if err == nil && req.typ == frameWorkload {
			if !first {
				f.write(frameError, "", []byte("workload evidence must come before any request"))
				return fmt.Errorf("%w: workload evidence after a request", ErrProtocol)
			}
			report, hskcek, _, perr := splitEvidence(req.payload)
			if perr != nil {
				f.write(frameError, "", []byte(perr.Error()))
				return perr
			}
			peer.Workload = &WorkloadEvidence{Report: bytes.Clone(report), HSKCEK: bytes.Clone(hskcek), ReportData: WorkloadReportData(exporter, backendNonce)}
			if !quiet {
				log.Info("workload evidence received (checked when a bound instance is used)")
			}
			continue
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				if !quiet {
					log.Info("attested link session closed")
				}
				return nil
			}
			f.write(frameError, "", []byte(err.Error()))
			return err
		}
		// Asked on every call, not once per session: an instance can be
		// created, bound to its workload or deleted while a session lives.
		caps, err := s.Authorizer.Authorize(ctx, peer, req.instance)
		if err != nil {
			f.write(frameError, req.instance, []byte(fmt.Sprintf("client %q may not use instance %q: %v", client.Subject.CommonName, req.instance, err)))
			return fmt.Errorf("instance %q refused: %w", req.instance, err)
		}
		if prev, ok := authorized[req.instance]; !ok || prev != caps {
			authorized[req.instance] = caps
			if !quiet {
				log.Info("instance authorised", "instance", req.instance, "capabilities", caps.String())
			}
		}
		out, err = s.Handler.Call(ctx, req.instance, caps, req.payload, out[:0])
		if err != nil {
			f.write(frameError, req.instance, []byte(err.Error()))
			return fmt.Errorf("instance %q: %w", req.instance, err)
		}
		if err := f.write(frameResponse, req.instance, out); err != nil {
			return fmt.Errorf("sending response: %w", err)
		}
	}
}
