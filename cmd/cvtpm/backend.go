package main

// "cvtpm backend": the vTPM CVM's daemon, and its management client.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"cvtpm/internal/confine"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/grpc"

	backendpb "cvtpm/api/backend"
	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/ca/keybroker"
	"cvtpm/enroll"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/cliconf"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/obs"
	"cvtpm/internal/pkisig"
	"cvtpm/vtpm/backend"
)

func init() {
	register(command{name: "backend", summary: "the vTPM CVM daemon: instances, attested link, management API", run: runBackend})
}

func runBackend(ctx context.Context, args []string) error {
	if len(args) > 0 {
		switch args[0] {
		case "create", "list", "delete":
			return runBackendAdmin(ctx, args[0], args[1:])
		}
	}
	fs := flag.NewFlagSet("cvtpm backend", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm backend --dir DIR --key-broker ADDR --broker-root service-ca.pem --backend-id ID [--migration-domain D]
                     --client-ca FILE --acl FILE [options]
       cvtpm backend --dir DIR --master-key-file FILE|--master-key-fd N ...    (development)
       cvtpm backend create --admin SOCKET [--enroll | --incoming | --import DIR] [--bind FILE] ID
       cvtpm backend list|delete --admin SOCKET [ID]

Runs the vTPM backend inside the CSV confidential VM. Each instance is a
libtpms worker process with its own sealed state in DIR/<id>; a worker that
dies is restarted from that state. Clients (the host frontend, guest
proxies) reach instances over the attested link on --listen: TLS 1.3 with
client certificates from --client-ca, after which the backend proves with a
CSV report (the real /dev/csv-guest, or the simulator in --csv-sim) that the
session ends inside this CVM. --acl names which client may use which
instance, and what it may do with it:

  {"clients": {
    "frontend-host1": {"instances": ["*"],   "capabilities": ["host"]},
    "guest-vm1":      {"instances": ["vm1"], "capabilities": ["guest"]}}}

"host" (QEMU through the frontend) may send TPM commands at localities 0-3,
reset the TPM and migrate it with sealed state; "guest" may send commands
only. "hcrtm" and "locality4" must be granted by name. No caller ever gets
or loads plaintext state over the link: state leaves an instance sealed for
that instance under the migration key (from the key broker, or
--migration-key-file), and only such state, not older than the instance's
own, is loaded. "create --bind FILE" ties an instance to its workload VM:
only a session proving with the workload's own CSV report reaches it, and
the host path is limited as FILE says (see vtpm/backend/README.md).

Instances are created, listed and deleted through the management API on the
unix socket --admin (default DIR/admin.sock), e.g.

  cvtpm backend create --admin DIR/admin.sock vm1
  cvtpm backend list   --admin DIR/admin.sock

Keys: with --key-broker the backend proves with a CSV report (bound to a
fresh nonce and an ephemeral key) that it runs the approved image, and the
broker releases its master key (every instance's state key derives from it)
and its migration domain's key, wrapped to that ephemeral key and signed by
the CA service root of --broker-root (also what its TLS port must present). The broker also keeps each instance's highest
state generation: an instance whose directory is older (an old copy put
back by the host) is refused. --master-key-file and --master-key-fd are for development:
the link attests the image, not where such a key came from.

With --ca, "create --enroll" also creates the instance's EKs and has the EK
CA certify them (see 'cvtpm enroll --help').

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("dir", "", "directory of the instances' sealed state (required)")
	listen := fs.String("listen", "tcp:127.0.0.1:7700", "attested link address: tcp:HOST:PORT, unix:PATH or vsock:PORT")
	logFlags := obs.AddLogFlags(fs)
	metricsAddr := fs.String("metrics", "", "serve /metrics (Prometheus), /healthz and /readyz on this HOST:PORT ('' = off)")
	admin := fs.String("admin", "", "management API unix socket (default DIR/admin.sock)")
	keyFile := fs.String("master-key-file", "", "development: hex master key (32+ bytes) from which each instance's state key is derived")
	keyFD := fs.Int("master-key-fd", -1, "development: read the hex master key from this inherited descriptor instead of --master-key-file")
	cliconf.Alias(fs, "master-key-file", "key-file")
	cliconf.Alias(fs, "master-key-fd", "key-fd")
	cipher := fs.String("cipher", "aes-256-gcm", "state AEAD: aes-256-gcm or sm4-gcm")
	clientCA := fs.String("client-ca", "", "PEM file of the CA(s) that issue link client certificates (cvtpm ca: DIR/identity-ca.pem) (required)")
	clientCRL := fs.String("client-crl", "", "URL of the link client CA's CRL (cvtpm ca: http://CA:7080/crl/identity): revoked identities are refused; no fresh CRL, no clients")
	crlRefresh := fs.Duration("client-crl-refresh", 30*time.Second, "fetch the --client-crl again after this long (a revocation takes effect within it)")
	aclFile := fs.String("acl", "", "JSON access list: client certificate CN -> instances (required)")
	simDir := fs.String("csv-sim", "", "use the CSV simulator saved in DIR when /dev/csv-guest is absent (tests, demos)")
	hskCEK := fs.String("hsk-cek", "", "this chip's HSK+CEK bundle, sent to clients with each report")
	caAddr := fs.String("ca", "", "EK CA gRPC address, for 'create --enroll'")
	caFingerprint := fs.String("ca-fingerprint", "", caFingerprintHelp+" (default: that of --broker-root)")
	broker := fs.String("key-broker", "", "key broker gRPC address (cvtpm ca --key-broker): the master and migration keys are released there on this CVM's CSV evidence")
	brokerRoot := fs.String("broker-root", "", "the CA's service root (its DIR/service-ca.pem): it signs the key broker's answers and the CA's TLS certificate")
	backendID := fs.String("backend-id", "", "this backend's name at the key broker (whose master key, whose anchors)")
	migrationDomain := fs.String("migration-domain", "", "the key broker's migration domain: backends of one domain can migrate instances between them")
	workerSeccomp := fs.String("worker-seccomp", "kill", "what a worker's system call outside its seccomp list gets: kill (the worker; it is restarted from its sealed state) or log (allowed and logged by the kernel, audit type 1326: only to find what a new platform needs)")
	migrationKeyFile := fs.String("migration-key-file", "", "hex migration key (32 bytes) shared by the backends an instance may migrate between; without it state never leaves this backend")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	// The supervisor holds every instance's key: processes of its user
	// without CAP_SYS_PTRACE (its workers, internal/confine) must not read
	// its memory or reopen its descriptors through /proc, from before the
	// first key is read (a key source may block: a FIFO, the broker).
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the backend non-dumpable: %w", err)
	}
	keySources := 0
	for _, set := range []bool{*keyFile != "", *keyFD >= 0, *broker != ""} {
		if set {
			keySources++
		}
	}
	if *dir == "" || keySources != 1 || *clientCA == "" || *aclFile == "" {
		return usageError("--dir, one of --key-broker, --master-key-file and --master-key-fd, --client-ca and --acl are required (see --help)")
	}
	if *cipher != "aes-256-gcm" && *cipher != "sm4-gcm" {
		return usageError(fmt.Sprintf("--cipher %q: want aes-256-gcm or sm4-gcm", *cipher))
	}
	if *broker != "" && (*brokerRoot == "" || *backendID == "") {
		return errors.New("--key-broker needs --broker-root (the CA's service-ca.pem: it signs the broker's answers and its TLS certificate) and --backend-id")
	}
	if *broker != "" && *migrationKeyFile != "" {
		return errors.New("--migration-key-file and --key-broker exclude each other: the broker releases the migration key of --migration-domain")
	}
	// Values used only later (by the key broker, by create --enroll) are
	// checked now: the backend says it serves only when it can.
	if *brokerRoot != "" {
		if _, err := readCertFile(*brokerRoot); err != nil {
			return flagError("--broker-root", err)
		}
	}
	if *caFingerprint != "" {
		if _, err := ca.ParseFingerprint(*caFingerprint); err != nil {
			return flagError("--ca-fingerprint", err)
		}
	}
	for _, a := range []struct{ flag, addr string }{{"--ca", *caAddr}, {"--key-broker", *broker}} {
		if a.addr != "" {
			if _, err := netaddr.GRPCTarget(a.addr); err != nil {
				return flagError(a.flag, err)
			}
		}
	}
	if *clientCRL != "" {
		if err := checkHTTPURL(*clientCRL); err != nil {
			return flagError("--client-crl", err)
		}
	}
	// One backend per directory (each instance's worker locks its own
	// directory as well).
	lock, err := ownDir(*dir, "backend directory")
	if err != nil {
		return err
	}
	defer lock.Release()
	log, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	acl, err := backend.OpenACLFile(*aclFile)
	if err != nil {
		return fmt.Errorf("--acl: %w", err)
	}
	pem, err := os.ReadFile(*clientCA)
	if err != nil {
		return fmt.Errorf("--client-ca: %w", err)
	}
	issuers, err := parsePEMCertificates(pem)
	if err != nil {
		return fmt.Errorf("--client-ca %s: %w", *clientCA, err)
	}
	pool := x509.NewCertPool()
	for _, c := range issuers {
		// A root is self-signed: garbage, a leaf or a truncated copy is
		// refused at start, not found out at the first client.
		if err := c.CheckSignatureFrom(c); err != nil {
			return fmt.Errorf("--client-ca %s: %q is not a self-signed CA certificate: %w", *clientCA, c.Subject.CommonName, err)
		}
		pool.AddCert(c)
	}
	var revocation *backend.ClientRevocation
	if *clientCRL != "" {
		revocation = &backend.ClientRevocation{Issuers: issuers,
			CRL: &pkisig.CachedCRL{Source: pkisig.HTTPCRL{URL: *clientCRL}, MaxAge: *crlRefresh}}
	} else {
		log.Warn("no --client-crl: revoked link identities are not refused")
	}
	evidence, err := csv.OpenProvider(csv.ProviderOptions{SimulatorDir: *simDir})
	if err != nil && *simDir != "" {
		return flagError("--csv-sim", err)
	} else if err != nil {
		return fmt.Errorf("CSV evidence: %w (outside a CSV guest: --csv-sim DIR)", err)
	}
	var bundle []byte
	switch {
	case *hskCEK != "":
		if bundle, err = os.ReadFile(*hskCEK); err != nil {
			return fmt.Errorf("--hsk-cek: %w", err)
		}
		if _, _, err := csv.ParseHSKCEK(bundle); err != nil {
			return fmt.Errorf("--hsk-cek: %w", err)
		}
	default:
		if sim, ok := evidence.(*csv.Simulator); ok {
			bundle = csv.MarshalHSKCEK(sim.HSK, sim.CEK)
			log.Warn("using the CSV SIMULATOR: clients that trust only HYGON's real root will refuse this backend", "dir", *simDir)
		}
	}
	cfg := backend.Config{Dir: *dir, Cipher: *cipher, Logger: log, Evidence: evidence, ChipCerts: bundle}
	switch {
	case *broker != "":
		released, anchorer, closeConn, err := releaseKeys(ctx, *broker, *brokerRoot, *backendID, *migrationDomain, *cipher, evidence, log)
		if err != nil {
			return err
		}
		defer closeConn()
		keys, err := backend.NewMasterKey(released.MasterKey)
		if err != nil {
			return err
		}
		cfg.Keys, cfg.MigrationKey, cfg.Anchors, cfg.Moved, cfg.Anchorer = keys, released.MigrationKey, released.Anchors, released.Moved, anchorer
	case *keyFD >= 0:
		k, err := backend.MasterKeyFromFD(*keyFD)
		if err != nil {
			return fmt.Errorf("--master-key-fd: %w", err)
		}
		cfg.Keys = k
		log.Warn("master key from a descriptor (development setup): the link attests this image, not where its key came from; use --key-broker")
	default:
		k, err := backend.MasterKeyFromFile(*keyFile)
		if err != nil {
			return fmt.Errorf("--master-key-file: %w", err)
		}
		cfg.Keys = k
		log.Warn("master key read from a file on the CVM's disk (development setup): whoever placed the file can open every instance's state; use --key-broker", "file", *keyFile)
	}
	if *migrationKeyFile != "" {
		mk, err := backend.MasterKeyFromFile(*migrationKeyFile)
		if err != nil {
			return fmt.Errorf("--migration-key-file: %w", err)
		}
		cfg.MigrationKey = mk.Bytes()
		if n := len(cfg.MigrationKey); n != 32 && n != 64 {
			return fmt.Errorf("--migration-key-file: the key is %d bytes: want 32 (or 64)", n)
		}
		log.Warn("migration key read from a file on the CVM's disk (development setup): whoever placed the file can open migrated state", "file", *migrationKeyFile)
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	// The lean worker binary beside cvtpm when there is one (make build
	// puts it there): an idle instance then costs a fraction of what the
	// full cvtpm binary does.
	cfg.Worker = []string{exe, "worker"}
	if lean, ok := trustedSibling("cvtpm-worker"); ok {
		cfg.Worker = []string{lean}
	}
	// Workers run libtpms on commands from the host and the guests: each
	// is confined to what serving its instance takes (internal/confine).
	mode, err := confine.ParseMode(*workerSeccomp)
	if err != nil {
		return fmt.Errorf("--worker-seccomp: %w", err)
	}
	if mode == confine.ModeLog {
		log.Warn("workers run with --worker-seccomp log: a system call outside their list is logged, not refused (not for production)")
	}
	cfg.Worker = append(cfg.Worker, "--seccomp", string(mode))
	sup, err := backend.New(ctx, cfg)
	if err != nil {
		return err
	}
	defer sup.Close()

	var enroller backend.Enroller
	if *caAddr != "" {
		pin := *caFingerprint
		if pin == "" && *brokerRoot != "" {
			der, err := readCertFile(*brokerRoot)
			if err != nil {
				return fmt.Errorf("--broker-root: %w", err)
			}
			pin = ca.Fingerprint(der)
		}
		conn, err := dialCA("--ca", *caAddr, pin)
		if err != nil {
			return err
		}
		defer conn.Close()
		enroller = instanceEnroller{ca: ca.Client{C: capb.NewCAClient(conn)}, evidence: evidence}
	}
	adminPath := *admin
	if adminPath == "" {
		adminPath = filepath.Join(*dir, "admin.sock")
	}
	aln, err := netaddr.Listen("unix:" + adminPath)
	if err != nil {
		return fmt.Errorf("--admin: %w", err)
	}
	gs := grpc.NewServer()
	obs.RegisterHealth(gs, "cvtpm.backend.v1.Backend")
	backendpb.RegisterInstanceManagerServer(gs, &backend.AdminServer{Supervisor: sup, Enroller: enroller})

	cert, err := attestedlink.EphemeralCertificate()
	if err != nil {
		return err
	}
	ln, err := netaddr.Listen(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	link := &attestedlink.Server{
		TLS:      &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool},
		Evidence: evidence, HSKCEK: bundle,
		Authorizer: &backend.Access{ACL: acl, Bindings: sup, Revocation: revocation}, Handler: sup, Logger: log,
	}
	errc := make(chan error, 2)
	go func() { errc <- gs.Serve(aln) }()
	go func() { errc <- link.Serve(ctx, ln) }()
	obs.OnHangup(ctx, log, "--acl "+*aclFile, func() error {
		if err := acl.Reload(); err != nil {
			return err
		}
		// Sessions handed to workers are authorised again before the
		// reload is reported, as calls through the supervisor are.
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		sup.ReauthorizeDirect(rctx)
		return nil
	})
	metricsBound := ""
	if *metricsAddr != "" {
		if metricsBound, err = obs.Serve(ctx, *metricsAddr, func(context.Context) error { return sup.Ready() }, log); err != nil {
			return err
		}
	}
	log.Info("backend serving", "link", ln.Addr().String(), "admin", adminPath, "instances", len(sup.List()), "metrics", metricsBound)
	if err := obs.NotifyReady(); err != nil {
		log.Warn("systemd readiness", "err", err)
	}
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	gs.Stop()
	ln.Close()
	return err
}

// instanceEnroller certifies a new instance's EKs with the EK CA.
type instanceEnroller struct {
	ca       enroll.CA
	evidence csv.ReportProvider
}

func (e instanceEnroller) EnrollInstance(ctx context.Context, id string, tpm transport.TPM) ([]*backendpb.EnrolledEK, error) {
	// A new instance is initialised but not started up.
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
		return nil, fmt.Errorf("TPM2_Startup: %w", err)
	}
	c := &enroll.Client{TPM: tpm, CA: e.ca, Evidence: e.evidence, InstanceID: id}
	results, err := c.Enroll(ctx, enroll.DefaultSlots)
	if err != nil {
		return nil, err
	}
	var out []*backendpb.EnrolledEK
	for _, r := range results {
		out = append(out, &backendpb.EnrolledEK{Algorithm: r.Slot.Name, Persistent: uint32(r.Slot.Persistent),
			NvIndex: uint32(r.Slot.CertIndex), Serial: r.Certificate.SerialNumber.Text(16)})
	}
	return out, nil
}

func runBackendAdmin(ctx context.Context, verb string, args []string) error {
	fs := flag.NewFlagSet("cvtpm backend "+verb, flag.ContinueOnError)
	sock := fs.String("admin", "", "the backend's management socket (DIR/admin.sock)")
	enrollEKs := fs.Bool("enroll", false, "create: also create the EKs and have the EK CA certify them")
	incoming := fs.Bool("incoming", false, "create: no TPM state yet; wait for an instance migrated from another backend")
	importDir := fs.String("import", "", "create: start from swtpm's unencrypted state files in DIR (inside the CVM; logged)")
	bind := fs.String("bind", "", `create: bind the instance to its workload VM: JSON {"workload": {CSV policy}, "host": "full|boot|none"}`)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: cvtpm backend %s --admin SOCKET %s\n\nOptions:\n", verb, map[string]string{
			"create": "[--enroll | --incoming | --import DIR] [--bind FILE] ID", "list": "", "delete": "ID"}[verb])
		fs.PrintDefaults()
	}
	if done, err := parseFlagsArgs(fs, args); done {
		return err
	}
	wantArgs := map[string]int{"create": 1, "list": 0, "delete": 1}[verb]
	if *sock == "" || fs.NArg() != wantArgs {
		fs.Usage()
		return exitError{2}
	}
	if verb != "create" {
		for _, f := range []struct {
			name string
			set  bool
		}{{"--enroll", *enrollEKs}, {"--incoming", *incoming}, {"--import", *importDir != ""}, {"--bind", *bind != ""}} {
			if f.set {
				return usageError(f.name + " applies to 'backend create' only")
			}
		}
	}
	dir := *importDir
	if dir != "" {
		if err := checkDir("--import", dir); err != nil {
			return err
		}
		dir, _ = filepath.Abs(dir)
	}
	var binding []byte
	if *bind != "" {
		var err error
		if binding, err = os.ReadFile(*bind); err != nil {
			return fmt.Errorf("--bind: %w", err)
		}
	}
	conn, err := dialUnix("--admin", *sock)
	if err != nil {
		return err
	}
	defer conn.Close()
	c := backendpb.NewInstanceManagerClient(conn)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	switch verb {
	case "create":
		inst, err := c.CreateInstance(ctx, &backendpb.CreateInstanceRequest{Id: fs.Arg(0), Enroll: *enrollEKs, Incoming: *incoming, ImportDir: dir, WorkloadBinding: binding})
		if err != nil {
			return fmt.Errorf("creating instance %q: %w", fs.Arg(0), err)
		}
		switch {
		case *incoming:
			fmt.Printf("instance %s created, waiting for migrated state (worker pid %d)\n", inst.Id, inst.Pid)
		case dir != "":
			fmt.Printf("instance %s created from the swtpm state in %s (worker pid %d)\n", inst.Id, dir, inst.Pid)
		default:
			fmt.Printf("instance %s created (worker pid %d)\n", inst.Id, inst.Pid)
		}
		if binding != nil {
			fmt.Printf("  bound to its workload VM (%s): guest sessions must prove it with the workload's own CSV report\n", *bind)
		}
		for _, ek := range inst.Enrolled {
			fmt.Printf("  %-9s EK at 0x%08x certified (serial %s), certificate in NV 0x%08x\n", ek.Algorithm, ek.Persistent, ek.Serial, ek.NvIndex)
		}
	case "list":
		resp, err := c.ListInstances(ctx, &backendpb.ListInstancesRequest{})
		if err != nil {
			return fmt.Errorf("listing instances: %w", err)
		}
		fmt.Printf("%-20s %-10s %8s %8s  %s\n", "ID", "STATE", "PID", "RESTARTS", "CREATED")
		for _, i := range resp.Instances {
			fmt.Printf("%-20s %-10s %8d %8d  %s\n", i.Id, i.State, i.Pid, i.Restarts, time.Unix(i.CreatedUnix, 0).UTC().Format(time.RFC3339))
			if i.Error != "" {
				fmt.Printf("  %s\n", i.Error)
			}
		}
	case "delete":
		if _, err := c.DeleteInstance(ctx, &backendpb.DeleteInstanceRequest{Id: fs.Arg(0)}); err != nil {
			return fmt.Errorf("deleting instance %q: %w", fs.Arg(0), err)
		}
		fmt.Printf("instance %s deleted with its state\n", fs.Arg(0))
	}
	return nil
}

// releaseKeys has the key broker release this backend's keys on its CSV
// evidence; the returned Anchorer records generations there.
func releaseKeys(ctx context.Context, addr, rootFile, id, domain, cipher string, evidence csv.ReportProvider, log *slog.Logger) (*keybroker.Released, backend.Anchorer, func(), error) {
	root, err := keybroker.RootPublicFromFile(rootFile)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--broker-root: %w", err)
	}
	rootDER, err := readCertFile(rootFile)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--broker-root: %w", err)
	}
	conn, err := dialCA("--key-broker", addr, ca.Fingerprint(rootDER))
	if err != nil {
		return nil, nil, nil, err
	}
	c := &keybroker.Client{KB: capb.NewKeyBrokerClient(conn), RootPublic: root, Evidence: evidence}
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	log.Info("asking the key broker for this backend's keys", "broker", addr, "backend_id", id, "migration_domain", domain)
	released, err := c.Release(rctx, id, domain, cipher)
	if err != nil {
		conn.Close()
		return nil, nil, nil, fmt.Errorf("--key-broker %s: %w", addr, err)
	}
	log.Info("keys released by the key broker", "anchored_instances", len(released.Anchors), "migration_key", released.MigrationKey != nil)
	return released, keybroker.NewReporter(c, id, domain, released), func() { conn.Close() }, nil
}

// parsePEMCertificates parses every CERTIFICATE block.
func parsePEMCertificates(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no certificate")
	}
	return out, nil
}

// trustedSibling returns the path of the program name beside this
// executable (make build puts cvtpm-worker, cvtpm-swtpm and
// cvtpm-verifier there) if it is one cvtpm may run: a regular executable
// file owned by root or by this executable's owner, which no one else may
// write. In a directory others may add files to (a sticky /tmp), a file
// planted there would otherwise run as whoever runs cvtpm.
func trustedSibling(name string) (string, bool) {
	exe, err := os.Executable()
	if err != nil {
		return "", false
	}
	self, err := os.Stat(exe)
	if err != nil {
		return "", false
	}
	path := filepath.Join(filepath.Dir(exe), name)
	// The directory entry too: a symlink another user planted in a shared
	// directory is refused even when it points at a root-owned program.
	entry, err := os.Lstat(path)
	if err != nil {
		return "", false
	}
	if e, s := entry.Sys().(*syscall.Stat_t), self.Sys().(*syscall.Stat_t); e == nil || s == nil || e.Uid != 0 && e.Uid != s.Uid {
		return "", false
	}
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 || fi.Mode()&0o022 != 0 {
		return "", false
	}
	owner, selfOwner := fi.Sys().(*syscall.Stat_t), self.Sys().(*syscall.Stat_t)
	if owner == nil || selfOwner == nil || owner.Uid != 0 && owner.Uid != selfOwner.Uid {
		return "", false
	}
	return path, true
}
