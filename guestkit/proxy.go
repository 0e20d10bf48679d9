package guestkit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"

	"github.com/google/go-tpm/tpm2/transport"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/netaddr"
	"cvtpm/vtpm/swtpmproto"
	"cvtpm/vtpm/tpmrpc"
)

// Proxy exposes a backend instance inside the guest as a local TPM. Its
// attested session runs end to end from the guest to the backend; the
// host's frontend only relays the TLS bytes.
type Proxy struct {
	// Link is the relay's (or the backend's) address in netaddr syntax,
	// e.g. "vsock:2:7701" in a VM or "tcp:127.0.0.1:7701" in tests.
	Link     string
	Instance string
	Config   attestedlink.ClientConfig
	Logger   *slog.Logger
	// LockHost closes the host path of an instance bound with host
	// "boot" once connected (the session must carry workload evidence).
	LockHost bool
	// Direct, if set, is the cipher (gcm.AES256 or gcm.SM4) of a second
	// attested session that the backend hands to the instance's worker:
	// ordinary TPM commands then skip the backend's supervisor. Empty:
	// every call goes through the supervisor.
	Direct string

	tpm    *tpmrpc.Client
	caller *attestedlink.InstanceCaller
	closer io.Closer // caller, or the DirectCaller around it
	srv    *swtpmproto.Server
}

func (p *Proxy) dial(ctx context.Context) (*attestedlink.Session, error) {
	conn, err := netaddr.Dial(ctx, p.Link)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", p.Link, err)
	}
	return attestedlink.Dial(ctx, conn, p.Config)
}

// Connect attests the backend and returns its appraised claims. Nothing
// is served, and no TPM command is sent, before it succeeds.
func (p *Proxy) Connect(ctx context.Context) (*csv.Claims, error) {
	log := p.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var tpm *tpmrpc.Client
	var caller *attestedlink.InstanceCaller
	var closer io.Closer
	if p.Direct != "" {
		var dc *attestedlink.DirectCaller
		tpm, dc = attestedlink.RemoteTPMDirect(p.Instance, p.Direct, p.dial, log)
		caller, closer = dc.Supervisor, dc
	} else {
		tpm, caller = attestedlink.RemoteTPM(p.Instance, p.dial, log)
		closer = caller
	}
	s, err := caller.Connect(ctx)
	if err != nil {
		closer.Close()
		return nil, err
	}
	if p.LockHost {
		if err := tpm.LockHost(); err != nil {
			closer.Close()
			return nil, fmt.Errorf("locking the host path: %w", err)
		}
		log.Info("host path locked until the next VM reset", "instance", p.Instance)
	}
	// Only a proxy that connected has a TPM to hand out.
	p.tpm, p.caller, p.closer = tpm, caller, closer
	p.srv = swtpmproto.New(tpm, swtpmproto.Options{Logger: log})
	return s.Claims(), nil
}

// TPM is the instance as a go-tpm transport in this process, for a Go
// agent in the guest (go-tpm, go-attestation through
// attest.OpenConfig.CommandChannel, the Attester): its commands take the
// same attested, end-to-end encrypted session as the served sockets'
// (a direct session with the instance's worker when Direct is set), with
// no proxy process and no local socket in between, one wake-up of a
// process less per command. Nil until Connect has succeeded; after Close
// its commands fail (nothing dials again). Safe for concurrent use
// (commands are serialised); call it after Connect has returned.
func (p *Proxy) TPM() transport.TPM {
	if p.tpm == nil {
		return nil // not connected
	}
	return p.tpm
}

// ServeData serves the swtpm data channel (raw TPM commands) on ln.
func (p *Proxy) ServeData(ctx context.Context, ln net.Listener) error {
	return p.srv.ServeData(ctx, ln, false)
}

// ServeControl serves the swtpm control channel on ln.
func (p *Proxy) ServeControl(ctx context.Context, ln net.Listener) error {
	return p.srv.ServeControl(ctx, ln)
}

// ServeMssim serves the Microsoft simulator protocol (command port; the
// platform port is ServeMssimPlatform).
func (p *Proxy) ServeMssim(ctx context.Context, command, platform net.Listener) error {
	errc := make(chan error, 2)
	go func() { errc <- p.srv.ServeMssimCommand(ctx, command) }()
	go func() { errc <- p.srv.ServeMssimPlatform(ctx, platform) }()
	return <-errc
}

// Close ends the attested session.
func (p *Proxy) Close() error {
	if p.closer == nil {
		return nil
	}
	return p.closer.Close()
}
