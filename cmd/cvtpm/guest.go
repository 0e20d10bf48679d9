package main

// "cvtpm guest ...": the tools that run inside a workload VM.

import (
	"context"
	"cvtpm/attest/csv"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"

	"cvtpm/guestkit"
	"cvtpm/internal/confine"
	"cvtpm/internal/gcm"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/obs"
)

func init() {
	register(command{name: "guest", summary: "in-guest tools: 'guest proxy' (a backend instance as a local TPM), 'guest attest', 'guest measure'", run: runGuest})
}

func runGuest(ctx context.Context, args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "proxy":
			return runGuestProxy(ctx, args[1:])
		case "attest":
			return runGuestAttest(ctx, args[1:])
		case "measure":
			return runGuestMeasure(ctx, args[1:])
		}
	}
	fmt.Fprint(os.Stderr, `Usage: cvtpm guest proxy [options]    expose a backend instance as a local TPM
       cvtpm guest attest [options]   gather evidence and have it appraised
       cvtpm guest measure [options] TEXT...   extend a PCR and log the event
(run 'cvtpm guest proxy --help' or 'cvtpm guest attest --help')
`)
	return exitError{2}
}

func runGuestProxy(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm guest proxy", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm guest proxy --link ADDR --instance ID --tls-cert FILE --tls-key FILE --policy FILE
                        [--tcp HOST:PORT] [--unix PATH] [--mssim HOST:PORT]

Runs inside a workload VM. Opens an attested session to the backend through
the host's relay (--link, vsock:2:PORT in a VM), checks the backend's CSV
evidence against --policy before sending anything, and exposes the instance
locally as a TPM:

  --tcp 127.0.0.1:2321   swtpm protocol: data on PORT, control on PORT+1
                         (TCTI "swtpm:host=127.0.0.1,port=2321")
  --unix PATH            swtpm data socket at PATH, control at PATH.ctrl
  --mssim 127.0.0.1:2421 Microsoft simulator protocol, platform on PORT+1
                         (TCTI "mssim:host=127.0.0.1,port=2421")
  --vtpm-proxy           a /dev/tpmN through Linux's vtpm_proxy driver, so the
                         kernel and every TPM program use the instance

Every command and response travels encrypted end to end; the host sees only
TLS records.

Options:
`)
		fs.PrintDefaults()
	}
	linkAddr := fs.String("link", "", "relay (or backend) address: vsock:CID:PORT, tcp:HOST:PORT or unix:PATH (required)")
	instance := fs.String("instance", "", "the backend instance to expose (required)")
	tcp := fs.String("tcp", "", "serve the swtpm protocol on HOST:PORT (control on PORT+1)")
	unixPath := fs.String("unix", "", "serve the swtpm data channel on this unix socket (control on PATH.ctrl)")
	mssim := fs.String("mssim", "", "serve the mssim protocol on HOST:PORT (platform on PORT+1)")
	vtpmProxy := fs.Bool("vtpm-proxy", false, "also create a /dev/tpmN for the instance through Linux's vtpm_proxy driver (/dev/vtpmx)")
	workload := fs.Bool("workload-evidence", false, "prove that this session is the workload VM with its own CSV report (/dev/csv-guest; needed for an instance bound to its workload)")
	workloadSim := fs.String("workload-csv-sim", "", "with --workload-evidence: the CSV simulator in DIR when /dev/csv-guest is absent (tests, demos)")
	workloadHSKCEK := fs.String("workload-hsk-cek", "", "with --workload-evidence: this VM's chip HSK+CEK bundle (default: the simulator's)")
	lockHost := fs.Bool("lock-host", false, "with --workload-evidence: close the host path of an instance bound with host \"boot\" until the next VM reset")
	direct := fs.String("direct", gcm.AES256, "ordinary TPM commands go through a second attested session that the backend hands to the instance's worker, sealed with this cipher ("+gcm.AES256+" or "+gcm.SM4+"), skipping the backend's supervisor; \"off\": everything through the supervisor")
	link := addLinkFlags(fs)
	logFlags := obs.AddLogFlags(fs)
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *linkAddr == "" || *instance == "" {
		return usageError("--link and --instance are required (see --help)")
	}
	// It holds the link identity's key and the sessions' keys: processes of its user without CAP_SYS_PTRACE must
	// not read its memory (/proc/PID/mem, ptrace), nor a crash write it
	// to a core file.
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the process non-dumpable: %w", err)
	}
	if *tcp == "" && *unixPath == "" && *mssim == "" && !*vtpmProxy {
		return errors.New("nothing to serve: give --tcp, --unix, --mssim and/or --vtpm-proxy (see --help)")
	}
	if err := netaddr.Check(*linkAddr); err != nil {
		return flagError("--link", err)
	}
	cipher, err := directCipher(*direct)
	if err != nil {
		return err
	}
	if *lockHost && !*workload {
		return usageError("--lock-host needs --workload-evidence: only the proven workload may lock the host path")
	}
	if !*workload && (*workloadSim != "" || *workloadHSKCEK != "") {
		return usageError("--workload-csv-sim and --workload-hsk-cek need --workload-evidence")
	}
	cfg, err := link.load()
	if err != nil {
		return err
	}
	log, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	if *workload {
		if cfg.Workload, cfg.WorkloadHSKCEK, err = workloadEvidence(*workloadSim, *workloadHSKCEK, log); err != nil {
			return err
		}
		if cfg.WorkloadHSKCEK == nil {
			// The backend checks a bound workload's report with the pair
			// the client sends.
			return errors.New("--workload-evidence on a real CSV guest needs --workload-hsk-cek (the chip's HSK+CEK bundle)")
		}
	}
	p := &guestkit.Proxy{Link: *linkAddr, Instance: *instance, Config: cfg, Logger: log, LockHost: *lockHost, Direct: cipher}
	claims, err := p.Connect(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	log.Info("backend attested", "measurement", fmt.Sprintf("%x", []byte(claims.Measure)), "chip", claims.ChipSerial, "simulated", claims.Simulated, "root", claims.Root.Name)

	errc := make(chan error, 6)
	serve := func(addr string, f func(context.Context, net.Listener) error) error {
		ln, err := netaddr.Listen(addr)
		if err != nil {
			return err
		}
		go func() { errc <- f(ctx, ln) }()
		return nil
	}
	pair := func(hostport string) (string, string, error) {
		host, port, err := net.SplitHostPort(hostport)
		if err != nil {
			return "", "", err
		}
		n, err := strconv.Atoi(port)
		if err != nil {
			return "", "", err
		}
		return "tcp:" + net.JoinHostPort(host, port), "tcp:" + net.JoinHostPort(host, strconv.Itoa(n+1)), nil
	}
	if *tcp != "" {
		data, ctrl, err := pair(*tcp)
		if err == nil {
			err = serve(data, p.ServeData)
		}
		if err == nil {
			err = serve(ctrl, p.ServeControl)
		}
		if err != nil {
			return fmt.Errorf("--tcp: %w", err)
		}
	}
	if *unixPath != "" {
		err := serve("unix:"+*unixPath, p.ServeData)
		if err == nil {
			err = serve("unix:"+*unixPath+".ctrl", p.ServeControl)
		}
		if err != nil {
			return fmt.Errorf("--unix: %w", err)
		}
	}
	if *mssim != "" {
		cmdAddr, platAddr, err := pair(*mssim)
		if err != nil {
			return fmt.Errorf("--mssim: %w", err)
		}
		cl, err := netaddr.Listen(cmdAddr)
		if err != nil {
			return fmt.Errorf("--mssim: %w", err)
		}
		pl, err := netaddr.Listen(platAddr)
		if err != nil {
			return fmt.Errorf("--mssim: %w", err)
		}
		go func() { errc <- p.ServeMssim(ctx, cl, pl) }()
	}
	if *vtpmProxy {
		go func() {
			errc <- p.ServeVTPMProxy(ctx, func(dev string) { log.Info("the instance is the kernel's TPM", "device", dev) })
		}()
	}
	log.Info("guest proxy serving", "instance", *instance, "tcp", *tcp, "unix", *unixPath, "mssim", *mssim, "vtpm-proxy", *vtpmProxy)
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		return err
	}
}

// workloadEvidence opens this workload VM's CSV firmware (/dev/csv-guest,
// or the simulator saved in simDir) and reads its chip's HSK+CEK bundle
// from hskCEKFile (the simulator's own pair if empty; nil on a real guest
// without the file).
func workloadEvidence(simDir, hskCEKFile string, log *slog.Logger) (csv.ReportProvider, []byte, error) {
	ev, err := csv.OpenProvider(csv.ProviderOptions{SimulatorDir: simDir})
	if err != nil && simDir != "" {
		return nil, nil, flagError("--workload-csv-sim", err)
	} else if err != nil {
		return nil, nil, fmt.Errorf("--workload-evidence: %w", err)
	}
	if hskCEKFile != "" {
		b, err := os.ReadFile(hskCEKFile)
		if err != nil {
			return nil, nil, fmt.Errorf("--workload-hsk-cek: %w", err)
		}
		return ev, b, nil
	}
	if sim, ok := ev.(*csv.Simulator); ok {
		log.Warn("workload evidence from the CSV SIMULATOR", "dir", simDir)
		return ev, csv.MarshalHSKCEK(sim.HSK, sim.CEK), nil
	}
	return ev, nil, nil
}
