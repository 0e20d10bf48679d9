// Command cvtpm-verifier is the combined TPM + CSV verifier service, run as
// "cvtpm verifier". It is a binary of its own so that the policy engine
// (OPA) and go-tpm-tools' verifier, which cost start-up time and memory,
// stay out of the vTPM processes (cvtpm socket, the backend's workers).
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"cvtpm/internal/version"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/csv"
	"cvtpm/attest/verifier"
	"cvtpm/internal/cliconf"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/obs"
	"cvtpm/internal/pkisig"
	"cvtpm/internal/serve"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "cvtpm verifier: %v\n", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func run(ctx context.Context, args []string) error {
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version" || args[0] == "version") {
		fmt.Println(version.String("cvtpm-verifier"))
		return nil
	}
	if len(args) > 0 && args[0] == "reference" {
		return runReference(args[1:])
	}
	fs := flag.NewFlagSet("cvtpm verifier", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm verifier --ek-root FILE --ak-root FILE --crl URL --crl URL --policy FILE --token-key FILE [options]
       cvtpm verifier reference --event-log FILE [--pcrs 0,1,...] [--out ref.json]

Appraises evidence from 'cvtpm guest attest' in one verdict of up to three
legs: the vTPM's quote (cvtpm-vtpm), the CSV report of the backend hosting
the vTPM (csv-platform) and, with --workload-policy, the workload VM's own
CSV report (csv-workload). The vTPM's EK and AK
certificates (from the cvtpm CA: the EK certificate must chain to --ek-root,
its ca.pem, the AK certificate to --ak-root, its ak-ca.pem; each is looked
up in its issuer's CRL: --crl http://CA:7080/crl --crl http://CA:7080/crl/ak),
its quote and event log, and a fresh CSV report of the backend hosting it,
all bound to one single-use nonce. The CSV half is judged by --policy (the
same JSON as the EK CA's evidence policy: trusted roots, approved
measurements, ...), the whole by a Rego policy (built in, or --rego) with
reference values (--reference, e.g. {"pcrs": {"sha256": {"16": "ab.."}}}).
The answer is an EAR token signed with --token-key (ECDSA P-256, created if
missing; its public key is written beside it as KEY.pub.pem).

APIs: gRPC cvtpm.attest.v1.Verifier on --listen; HTTP/JSON on --http
(POST /challenge, POST /attest).

Options:
`)
		fs.PrintDefaults()
	}
	ekRoot := fs.String("ek-root", "", "PEM file with the root(s) EK certificates must chain to (cvtpm ca: DIR/ca.pem) (required)")
	akRoot := fs.String("ak-root", "", "PEM file with the root(s) AK certificates must chain to (cvtpm ca: DIR/ak-ca.pem) (required)")
	var crlURLs []string
	fs.Func("crl", "an issuer's CRL URL, once per issuer: the EK root's (cvtpm ca: http://CA:7080/crl) and the AK root's (/crl/ak) (required unless --no-crl)", func(v string) error {
		crlURLs = append(crlURLs, v)
		return nil
	})
	noCRL := fs.Bool("no-crl", false, "run without revocation checks (revoked EK and AK certificates are then not detected)")
	policyFile := fs.String("policy", "", "CSV evidence policy, JSON (required)")
	workloadFile := fs.String("workload-policy", "", "CSV evidence policy (JSON, same fields as --policy) for the workload VM's own report, the verdict's third leg (csv-workload)")
	pgConn := fs.String("postgres", "", "keep challenges in PostgreSQL (libpq connection string), shared by verifier replicas behind a load balancer")
	requireWorkload := fs.Bool("require-workload", false, "refuse evidence without a workload report (needs --workload-policy)")
	regoFile := fs.String("rego", "", "Rego appraisal policy replacing the built-in one (package cvtpm, rule result)")
	refFile := fs.String("reference", "", "reference values for the policy (JSON)")
	certDir := fs.String("cert-dir", "", "look the reporting chip's HSK+CEK up by its serial in this offline directory (hsk_cek/<serial>/hsk_cek.cert)")
	kds := fs.String("kds", "", "look the reporting chip's HSK+CEK up by its serial at this HYGON KDS (default "+csv.DefaultKDS+" unless --cert-dir or --evidence-certs)")
	evidenceCerts := fs.Bool("evidence-certs", false, "use the HSK+CEK sent with the evidence (the chip serial is then the evidence's own claim: chip allow/deny lists are refused)")
	keyFile := fs.String("token-key", "", "EAR token signing key, PKCS #8 PEM (created if missing) (required)")
	cliconf.Alias(fs, "token-key", "key")
	listen := fs.String("listen", "127.0.0.1:7800", "gRPC address: HOST:PORT, tcp:HOST:PORT or unix:PATH")
	logFlags := obs.AddLogFlags(fs)
	httpAddr := fs.String("http", "127.0.0.1:7801", "HTTP/JSON address ('' = off)")
	if err := cliconf.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		fmt.Fprintf(os.Stderr, "cvtpm verifier: %v\n", err)
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %v\n", fs.Args())
		return errUsage
	}
	if *ekRoot == "" || *akRoot == "" || *policyFile == "" || *keyFile == "" {
		fmt.Fprintln(os.Stderr, "cvtpm verifier: --ek-root, --ak-root, --policy and --token-key are required (see --help)")
		return errUsage
	}
	// It holds the token signing key: processes of its user without
	// CAP_SYS_PTRACE must not read its memory (/proc/PID/mem, ptrace) and
	// a crash must not write it to a core file. (internal/confine's
	// NotDumpable would link the worker's constructor into this binary.)
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		return fmt.Errorf("making the verifier non-dumpable: %w", err)
	}
	log, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	ekRoots, err := readCertsPEM(*ekRoot)
	if err != nil {
		return fmt.Errorf("--ek-root: %w", err)
	}
	akRoots, err := readCertsPEM(*akRoot)
	if err != nil {
		return fmt.Errorf("--ak-root: %w", err)
	}
	// The files a SIGHUP reads again: policies, Rego, reference values.
	loadFiles := func(o *verifier.Options) error {
		var err error
		if o.CSV, err = csv.LoadAppraisalPolicy(*policyFile); err != nil {
			return fmt.Errorf("--policy: %w", err)
		}
		o.Workload = nil
		if *workloadFile != "" {
			if o.Workload, err = csv.LoadAppraisalPolicy(*workloadFile); err != nil {
				return fmt.Errorf("--workload-policy: %w", err)
			}
		}
		o.Policy, o.Reference = "", nil
		if *regoFile != "" {
			b, err := os.ReadFile(*regoFile)
			if err != nil {
				return fmt.Errorf("--rego: %w", err)
			}
			o.Policy = string(b)
		}
		if *refFile != "" {
			b, err := os.ReadFile(*refFile)
			if err != nil {
				return fmt.Errorf("--reference: %w", err)
			}
			if *regoFile == "" {
				// The built-in policy's reference values are checked
				// strictly: a misspelt key or a malformed value would
				// otherwise skip the check it was meant for.
				o.Reference, err = verifier.ParseReference(b)
			} else {
				err = json.Unmarshal(b, &o.Reference)
			}
			if err != nil {
				return fmt.Errorf("--reference %s: %w", *refFile, err)
			}
		}
		return nil
	}
	opts := verifier.Options{EKRoots: ekRoots, AKRoots: akRoots, RequireWorkload: *requireWorkload, Nonces: verifier.NewMemoryNonces(0)}
	if err := loadFiles(&opts); err != nil {
		return err
	}
	if *requireWorkload && *workloadFile == "" {
		return errors.New("--require-workload needs --workload-policy (what the workload VM's report must show)")
	}
	policy := opts.CSV
	// The chip serial in a report is not authenticated by the firmware:
	// with the HSK/CEK sent along, a forged serial (MAC recomputed)
	// would pass chip lists and the "report from another backend" check.
	// Looked up by serial, a forged one finds no CEK that verifies.
	if opts.Workload != nil && *evidenceCerts && (len(opts.Workload.AllowChips) > 0 || len(opts.Workload.DenyChips) > 0) {
		return fmt.Errorf("--workload-policy: %w", csv.ErrEvidenceCertsWithChipLists)
	}
	if opts.CSVCerts, err = csv.SelectCertSource(*certDir, *kds, *evidenceCerts, policy); err != nil {
		return fmt.Errorf("HSK+CEK source (--cert-dir, --kds, --evidence-certs): %w", err)
	}
	if *evidenceCerts {
		log.Warn("--evidence-certs: HSK+CEK taken from the evidence (they must still chain to a trusted root); the chip serial is not checked")
	}
	switch {
	case len(crlURLs) > 0 && *noCRL:
		return errors.New("--crl and --no-crl exclude each other")
	case len(crlURLs) > 0:
		for _, u := range crlURLs {
			opts.CRLs = append(opts.CRLs, &verifier.CachedCRL{Source: verifier.HTTPCRL{URL: u}})
		}
	case *noCRL:
		log.Warn("--no-crl: revoked EK and AK certificates will not be detected")
	default:
		return errors.New("--crl URL is required, once per issuer (the CA's /crl and /crl/ak); --no-crl runs without revocation checks on purpose")
	}
	if *pgConn != "" {
		pg, err := verifier.OpenPGNonces(ctx, *pgConn)
		if err != nil {
			return fmt.Errorf("--postgres: %w", err)
		}
		defer pg.Close()
		opts.Nonces = pg
	}
	if opts.Signer, err = loadOrCreateP256(*keyFile); err != nil {
		return fmt.Errorf("--token-key: %w", err)
	}
	v, err := verifier.New(ctx, opts)
	if err != nil {
		return err
	}
	srv := &verifier.Server{Verifier: v, Log: log}
	obs.OnHangup(ctx, log, "--policy, --workload-policy, --rego, --reference", func() error {
		next := opts
		if err := loadFiles(&next); err != nil {
			return err
		}
		nv, err := verifier.New(ctx, next)
		if err != nil {
			return err
		}
		srv.Replace(nv)
		return nil
	})
	// Evidence carries an event log (real firmware's can be some
	// hundred KiB), certificates and a report: 4 MiB is ample.
	gs := grpc.NewServer(serve.GRPCOptions(4 << 20)...)
	attestpb.RegisterVerifierServer(gs, srv)
	obs.RegisterHealth(gs, "cvtpm.attest.v1.Verifier")
	ln, err := netaddr.Listen(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	ln = serve.Listen(ln, "verifier gRPC", log)
	errc := make(chan error, 2)
	go func() { errc <- gs.Serve(ln) }()
	var hs *http.Server
	httpBound := ""
	if *httpAddr != "" {
		hl, err := netaddr.Listen(*httpAddr)
		if err != nil {
			return fmt.Errorf("--http: %w", err)
		}
		httpBound = hl.Addr().String()
		// Bounded: requests carry evidence (JSON: base64 of the above),
		// no more; slow or idle clients do not hold sockets.
		mux := http.NewServeMux()
		mux.Handle("/", srv.Handler())
		mux.Handle("GET /metrics", obs.Handler(nil))
		obs.AddHealth(mux, nil)
		hs = serve.HTTPServer(mux, verifier.MaxHTTPRequest)
		go func() { errc <- hs.Serve(serve.Listen(hl, "verifier HTTP", log)) }()
	}
	log.Info("verifier serving", "grpc", ln.Addr().String(), "http", httpBound, "key", *keyFile+".pub.pem")
	if err := obs.NotifyReady(); err != nil {
		log.Warn("systemd readiness", "err", err)
	}
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	gs.Stop()
	if hs != nil {
		hs.Close()
	}
	return err
}

// readCertsPEM returns the DER of every certificate in a PEM file.
func readCertsPEM(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		// A root is self-signed: anything else (garbage, a leaf, a
		// truncated copy) is refused here, not found out later.
		if err := pkisig.SignedBy(blk.Bytes, blk.Bytes); err != nil {
			return nil, fmt.Errorf("%s: certificate %d is not a self-signed root: %w", path, len(out)+1, err)
		}
		out = append(out, blk.Bytes)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return out, nil
}

// loadOrCreateP256 reads a PKCS #8 P-256 key, or creates one (0600) and
// writes its public key to path+".pub.pem".
func loadOrCreateP256(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		der, _ := x509.MarshalPKCS8PrivateKey(key)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
			return nil, err
		}
		pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
		return key, os.WriteFile(path+".pub.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644)
	}
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, fmt.Errorf("%s: not PEM", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: want an ECDSA P-256 key", path)
	}
	return ek, nil
}

// runReference turns a known-good boot's event log into a reference file
// for --reference.
func runReference(args []string) error {
	fs := flag.NewFlagSet("cvtpm verifier reference", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm verifier reference --event-log FILE [--pcrs 0,1,...] [--out ref.json]
                                 [--kernel-cmdline TEXT] [--initrd FILE]

Replays a known-good boot's TCG event log (in the guest:
/sys/kernel/security/tpm0/binary_bios_measurements, or the log 'cvtpm guest
measure' writes) into SHA-256 PCR values and writes them as reference values
for 'cvtpm verifier --reference': a later boot that measures anything else
in those PCRs is refused as pcr-N-not-reference.

The log holds only digests. --kernel-cmdline and --initrd check, before
anything is written, that the boot measured exactly this command line and
initrd (the Linux EFI stub's events in PCR 9; OVMF's direct kernel boot
appends " initrd=initrd" to the command line), so the reference values are
known to stand for them.

Options:
`)
		fs.PrintDefaults()
	}
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version") {
		fmt.Println(version.String("cvtpm-verifier"))
		return nil
	}
	logFile := fs.String("event-log", "", "the event log of a known-good boot (required)")
	pcrList := fs.String("pcrs", "", "comma-separated PCRs to pin (default: every PCR the log extends)")
	out := fs.String("out", "", "write the reference file here (default: standard output)")
	cmdline := fs.String("kernel-cmdline", "", "check that the log measured this kernel command line (as the firmware passed it)")
	initrd := fs.String("initrd", "", "check that the log measured this initrd file")
	if err := cliconf.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		fmt.Fprintf(os.Stderr, "cvtpm verifier reference: %v\n", err)
		return errUsage
	}
	if *logFile == "" {
		fmt.Fprintln(fs.Output(), "cvtpm verifier reference: --event-log is required (see --help)")
		return errUsage
	}
	log, err := os.ReadFile(*logFile)
	if err != nil {
		return fmt.Errorf("--event-log: %w", err)
	}
	var pcrs []int
	for _, f := range strings.Split(*pcrList, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 || n > 23 {
			return fmt.Errorf("--pcrs %q: want PCR numbers 0-23, comma-separated", *pcrList)
		}
		pcrs = append(pcrs, n)
	}
	cmdlineSet := false
	fs.Visit(func(f *flag.Flag) { cmdlineSet = cmdlineSet || f.Name == "kernel-cmdline" })
	if cmdlineSet {
		if err := verifier.CheckKernelCmdline(log, *cmdline); err != nil {
			return fmt.Errorf("--kernel-cmdline: %w", err)
		}
	}
	if *initrd != "" {
		b, err := os.ReadFile(*initrd)
		if err != nil {
			return fmt.Errorf("--initrd: %w", err)
		}
		if err := verifier.CheckInitrd(log, b); err != nil {
			return fmt.Errorf("--initrd %s: %w", *initrd, err)
		}
	}
	ref, err := verifier.ReferenceFromEventLog(log, pcrs)
	if err != nil {
		return fmt.Errorf("--event-log %s: %w", *logFile, err)
	}
	ref = append(ref, '\n')
	if *out == "" {
		_, err = os.Stdout.Write(ref)
		return err
	}
	if err := os.WriteFile(*out, ref, 0o644); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	return nil
}
