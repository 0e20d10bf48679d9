package frontend

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"

	"cvtpm/internal/attestedlink"
	"cvtpm/internal/logfield"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/pump"
	"cvtpm/internal/sockmap"
	"cvtpm/vtpm/swtpmproto"
	"cvtpm/vtpm/tpmrpc"
)

// Frontend serves VMs' TPMs from instances on one backend.
type Frontend struct {
	// Backend is the backend's link address (netaddr syntax).
	Backend string
	// Link is this frontend's identity and its evidence policy.
	Link   attestedlink.ClientConfig
	Logger *slog.Logger
	// Direct, if set, is the cipher of a second session per VM that the
	// backend hands to the instance's worker, which then serves QEMU's
	// ordinary TPM commands without the backend's supervisor (control
	// operations still go through it). Empty: everything through it.
	Direct string
}

func (f *Frontend) log() *slog.Logger {
	if f.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return f.Logger
}

// Dial opens an attested session with the backend.
func (f *Frontend) Dial(ctx context.Context) (*attestedlink.Session, error) {
	conn, err := netaddr.Dial(ctx, f.Backend)
	if err != nil {
		return nil, fmt.Errorf("backend %s: %w", f.Backend, err)
	}
	s, err := attestedlink.Dial(ctx, conn, f.Link)
	if err != nil {
		return nil, fmt.Errorf("backend %s: %w", f.Backend, err)
	}
	return s, nil
}

// VM is one instance opened for a VM's TPM: the backend attested, the
// instance there and this frontend allowed to use it.
type VM struct {
	Instance string
	tpm      *tpmrpc.Client
	closer   io.Closer // the InstanceCaller, or the DirectCaller around it
	log      *slog.Logger
}

// OpenVM attests the backend and asks it once for the instance's state,
// so that an instance that does not exist, or that this frontend's
// identity may not use, is an error at start-up and not at the VM's boot.
func (f *Frontend) OpenVM(ctx context.Context, instance string) (*VM, error) {
	log := f.log().With("instance", instance)
	var tpm *tpmrpc.Client
	var caller *attestedlink.InstanceCaller
	var closer io.Closer
	if f.Direct != "" {
		var dc *attestedlink.DirectCaller
		tpm, dc = attestedlink.RemoteTPMDirect(instance, f.Direct, f.Dial, log)
		caller, closer = dc.Supervisor, dc
	} else {
		tpm, caller = attestedlink.RemoteTPM(instance, f.Dial, log)
		closer = caller
	}
	s, err := caller.Connect(ctx)
	if err != nil {
		closer.Close()
		return nil, err
	}
	c := s.Claims()
	log.Info("backend attested", "measurement", fmt.Sprintf("%x", []byte(c.Measure)), "chip", c.ChipSerial, "simulated", c.Simulated, "root", c.Root.Name)
	tpm.Running()
	if err := tpm.Err(); err != nil {
		closer.Close()
		return nil, fmt.Errorf("instance %q: %w", instance, err)
	}
	return &VM{Instance: instance, tpm: tpm, closer: closer, log: log}, nil
}

// Close ends the VM's sessions with the backend.
func (v *VM) Close() error { return v.closer.Close() }

// Serve serves the swtpm control channel on ctrl (QEMU's -chardev
// socket), the data channel through CMD_SET_DATAFD, until ctx ends.
func (v *VM) Serve(ctx context.Context, ctrl net.Listener) error {
	srv := swtpmproto.New(v.tpm, swtpmproto.Options{
		Logger: v.log,
		// QEMU locks the state storage on a migration's destination. The
		// state lives in the backend, whose worker holds the instance's
		// directory lock for as long as it runs: nothing to do here.
		LockStorage: func(uint32) error { return nil },
		// The backend hands out and takes state only sealed under its
		// migration key; the blobs are flagged as migration-encrypted so
		// that swtpm or a plain cvtpm refuse them as such.
		Migration:    backendSealed{},
		MigrationKey: true,
	})
	return srv.ServeControl(ctx, ctrl)
}

// ServeVM serves one VM's TPM on ctrl, the unix socket QEMU's
// tpm-emulator chardev connects to (swtpm's control protocol, with the data
// channel passed by CMD_SET_DATAFD): OpenVM, then Serve. Commands go to
// instance over an attested session, opened and checked before serving.
func (f *Frontend) ServeVM(ctx context.Context, instance string, ctrl net.Listener) error {
	vm, err := f.OpenVM(ctx, instance)
	if err != nil {
		return err
	}
	defer vm.Close()
	return vm.Serve(ctx, ctrl)
}

// Relay passes guestkit connections to the backend as opaque bytes: the
// guest runs its own attested TLS session through it, so the host sees
// only ciphertext.
type Relay struct {
	Backend string
	Logger  *slog.Logger
	// Tap, if set, receives a copy of every byte relayed in either
	// direction (tests use it to show that nothing readable passes).
	Tap   io.Writer
	tapMu sync.Mutex
	// MaxPerSource bounds the connections relayed at once for one source
	// (a guest's address: a vsock CID, an IP), Max all of them (defaults
	// 64 and 4096): beyond them a connection is closed at once and
	// logged, so one guest cannot take the descriptors every other VM's
	// relay and QEMU socket need (each relayed connection costs several).
	MaxPerSource, Max int
	// Joiner, if set, forwards pairs of TCP connections in the kernel
	// (internal/sockmap) instead of copying them through this process,
	// without TCP's backpressure (see there); other connections, and all
	// of them when Tap is set, are copied.
	Joiner *sockmap.Joiner

	connLog logfield.Limiter
}

// Serve relays every connection accepted on ln until ctx ends.
func (r *Relay) Serve(ctx context.Context, ln net.Listener) error {
	log := r.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	per, max := r.MaxPerSource, r.Max
	if per <= 0 {
		per = 64
	}
	if max <= 0 {
		max = 4096
	}
	limits := &netaddr.Limits{Max: max, MaxPerSource: per, Name: "relay", Log: log}
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		in, err := netaddr.Accept(ln, log)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("relay: accept: %w", err)
		}
		src := netaddr.Source(in)
		if !limits.Admit(src) {
			in.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer limits.Release(src)
			defer in.Close()
			out, err := netaddr.Dial(ctx, r.Backend)
			// Per-connection lines within a rate per source: a guest that
			// connects in a loop must not fill the host's log.
			ok, held := r.connLog.Allow(src)
			if err != nil {
				if ok {
					log.Warn("relay: backend unreachable", "err", err, "similar_lines_suppressed", held)
				}
				return
			}
			defer out.Close()
			if ok {
				log.Info("relaying a guest connection", "from", in.RemoteAddr().String(), "connections_not_logged_before", held)
			}
			if r.Joiner != nil && r.Tap == nil {
				// The backend speaks only after the guest (TLS), as Join
				// requires; nothing has been forwarded yet.
				err := r.Joiner.Join(ctx, in, out)
				if !errors.Is(err, sockmap.ErrUnsupported) {
					return
				}
			}
			inFD, ok1 := in.(syscall.Conn)
			outFD, ok2 := out.(syscall.Conn)
			if r.Tap == nil && ok1 && ok2 {
				// A thread of its own copies the pair, outside Go's
				// scheduler (internal/pump); connections without a
				// descriptor are copied here.
				err := pump.Run(ctx, inFD, outFD)
				if !errors.Is(err, pump.ErrUnsupported) {
					if err != nil {
						log.Warn("relay: copying a connection", "err", err)
					}
					return
				}
			}
			// Both directions, as the copy thread does: a side's end is
			// passed on as a half-close and the other goes on.
			done := make(chan struct{}, 2)
			go func() { r.copy(out, in); done <- struct{}{} }()
			go func() { r.copy(in, out); done <- struct{}{} }()
			for range 2 {
				select {
				case <-done:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
}

// copy copies src to dst until src ends, then passes the end on: a
// half-close of dst's sending at src's EOF, or, when either side failed,
// both closed (which ends the other direction's copy too).
func (r *Relay) copy(dst, src net.Conn) {
	var err error
	if r.Tap == nil {
		// Between two TCP sockets io.Copy splices in the kernel.
		_, err = io.Copy(dst, src)
	} else {
		err = r.copyTapped(dst, src)
	}
	if err != nil {
		src.Close()
		dst.Close()
		return
	}
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	} else {
		dst.Close()
	}
}

// copyTapped is io.Copy that also hands every byte to r.Tap; nil at
// src's EOF.
func (r *Relay) copyTapped(dst, src net.Conn) error {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			r.tapMu.Lock()
			r.Tap.Write(buf[:n])
			r.tapMu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// backendSealed frames state blobs that the backend already sealed: the
// frontend has no key and passes the bytes through unchanged.
type backendSealed struct{}

func (backendSealed) Seal(b []byte) ([]byte, error) { return b, nil }
func (backendSealed) Open(b []byte) ([]byte, error) { return b, nil }
