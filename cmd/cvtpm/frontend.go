package main

// "cvtpm frontend": the host side; QEMU's swtpm sockets per VM, and the
// guestkit relay.

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"cvtpm/frontend"
	"cvtpm/internal/confine"
	"cvtpm/internal/gcm"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/obs"
	"cvtpm/internal/sockmap"
)

func init() {
	register(command{name: "frontend", summary: "host side: swtpm sockets for QEMU per VM, forwarded to the backend; guest relay", run: runFrontend})
}

type vmFlag []string

func (v *vmFlag) String() string     { return strings.Join(*v, ",") }
func (v *vmFlag) Set(s string) error { *v = append(*v, s); return nil }

func runFrontend(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm frontend", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm frontend --backend ADDR --tls-cert FILE --tls-key FILE --policy FILE
                      --vm INSTANCE=CTRL-SOCKET [--vm ...] [--relay ADDR]
       cvtpm frontend --backend ADDR --relay ADDR      (a relay alone needs no identity)

Runs on the host. For each --vm it serves swtpm's control protocol on the
unix socket CTRL-SOCKET, which is what QEMU's tpm-emulator uses:

  qemu-system-x86_64 -chardev socket,id=chrtpm,path=CTRL-SOCKET \
      -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0

and forwards every command to INSTANCE on the backend over an attested
session. Before serving, it checks the backend's CSV evidence against
--policy; an untrusted backend is refused before any TPM command is sent.

With --relay it also accepts guestkit connections (vsock:PORT in
production) and passes them to the backend as opaque bytes: the guest runs
its own attested session through the relay and the host cannot read it.

Options:
`)
		fs.PrintDefaults()
	}
	backendAddr := fs.String("backend", "tcp:127.0.0.1:7700", "the backend's attested link address")
	var vms vmFlag
	fs.Var(&vms, "vm", "INSTANCE=CTRL-SOCKET: serve INSTANCE to QEMU on this unix socket (repeatable)")
	relay := fs.String("relay", "", "accept guestkit connections here (vsock:PORT, tcp:HOST:PORT or unix:PATH) and relay them")
	perSource := fs.Int("relay-per-source", 64, "relay at most this many connections at once from one guest (source address); more are closed and logged")
	capture := fs.String("relay-capture", "", "append every relayed byte to FILE (debugging: shows the host sees only ciphertext)")
	direct := fs.String("direct", gcm.AES256, "QEMU's ordinary TPM commands go through a second attested session per VM that the backend hands to the instance's worker, sealed with this cipher ("+gcm.AES256+" or "+gcm.SM4+"), skipping the backend's supervisor; \"off\": everything through the supervisor")
	relayJoin := fs.String("relay-join", "off", "on: forward relayed TCP connections in the kernel (a BPF sockmap; needs root), which takes the relay's wake-ups off the attested path (measured no faster than the default copy thread) but gives up TCP's backpressure: a guest that sends without reading makes the host's kernel queue without bound (see internal/sockmap); off: copy through this process")
	sockMode := fs.String("socket-mode", "0600", "permissions of the --vm sockets (octal; e.g. 0660 with a group QEMU runs in)")
	link := addLinkFlags(fs)
	logFlags := obs.AddLogFlags(fs)
	metricsAddr := fs.String("metrics", "", "serve /metrics (Prometheus), /healthz and /readyz on this HOST:PORT ('' = off)")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if len(vms) == 0 && *relay == "" {
		return usageError("nothing to do: give --vm and/or --relay (see --help)")
	}
	// It holds its link identity's key and the sessions' keys: processes of its user without CAP_SYS_PTRACE must
	// not read its memory (/proc/PID/mem, ptrace), nor a crash write it
	// to a core file.
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the process non-dumpable: %w", err)
	}
	if err := netaddr.Check(*backendAddr); err != nil {
		return flagError("--backend", err)
	}
	if *capture != "" && *relay == "" {
		return usageError("--relay-capture needs --relay")
	}
	cipher, err := directCipher(*direct)
	if err != nil {
		return err
	}
	if *relayJoin != "on" && *relayJoin != "off" {
		return flagError("--relay-join", fmt.Errorf("%q: want on or off", *relayJoin))
	}
	if *relayJoin == "on" && *relay == "" {
		return usageError("--relay-join needs --relay")
	}
	if *relayJoin == "on" && *capture != "" {
		return usageError("--relay-join on and --relay-capture exclude each other: joined bytes do not pass through this process")
	}
	mode, err := strconv.ParseUint(*sockMode, 8, 32)
	if err != nil || mode > 0o777 {
		return fmt.Errorf("--socket-mode %q: want octal permissions such as 0660", *sockMode)
	}
	log, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	f := &frontend.Frontend{Backend: *backendAddr, Logger: log, Direct: cipher}
	errc := make(chan error, len(vms)+1)
	if len(vms) > 0 {
		cfg, err := link.load()
		if err != nil {
			return err
		}
		f.Link = cfg
		for _, vm := range vms {
			instance, sock, ok := strings.Cut(vm, "=")
			if !ok || instance == "" || sock == "" {
				return usageError(fmt.Sprintf("--vm %q: want INSTANCE=CTRL-SOCKET", vm))
			}
			// Attest the backend and check the instance before QEMU may
			// connect: a missing instance or an identity the backend's ACL
			// does not allow fails at start, not at the VM's boot.
			opened, err := f.OpenVM(ctx, instance)
			if err != nil {
				return fmt.Errorf("--vm %s: %w", vm, err)
			}
			defer opened.Close()
			ln, err := netaddr.Listen("unix:" + sock)
			if err != nil {
				return fmt.Errorf("--vm %s: %w", vm, err)
			}
			if err := os.Chmod(sock, os.FileMode(mode)); err != nil {
				return fmt.Errorf("--socket-mode: %w", err)
			}
			go func() { errc <- opened.Serve(ctx, ln) }()
			log.Info("serving a VM's TPM", "instance", instance, "ctrl", sock)
		}
	}
	if *relay != "" {
		ln, err := netaddr.Listen(*relay)
		if err != nil {
			return fmt.Errorf("--relay: %w", err)
		}
		r := &frontend.Relay{Backend: *backendAddr, Logger: log, MaxPerSource: *perSource}
		if *capture != "" {
			fcap, err := os.OpenFile(*capture, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			if err != nil {
				return fmt.Errorf("--relay-capture: %w", err)
			}
			defer fcap.Close()
			r.Tap = fcap
		}
		forwarding := "copied by this process"
		if *relayJoin == "on" {
			j, err := sockmap.New()
			if err != nil {
				return fmt.Errorf("--relay-join on: %w", err)
			}
			defer j.Close()
			r.Joiner, forwarding = j, "joined in the kernel (TCP to TCP; others copied)"
		}
		go func() { errc <- r.Serve(ctx, ln) }()
		log.Info("relaying guest connections", "listen", ln.Addr().String(), "backend", *backendAddr, "forwarding", forwarding)
	}
	if *metricsAddr != "" {
		bound, err := obs.Serve(ctx, *metricsAddr, nil, log)
		if err != nil {
			return err
		}
		log.Info("metrics and health", "listen", bound)
	}
	if err := obs.NotifyReady(); err != nil {
		log.Warn("systemd readiness", "err", err)
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}
