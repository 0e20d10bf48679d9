package main

// "cvtpm ca": the EK CA service, and "cvtpm ca revoke" on its admin socket.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	capb "cvtpm/api/ca"
	"github.com/emmansun/gmsm/sm2"
	"github.com/emmansun/gmsm/smx509"

	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/ca/keybroker"
	"cvtpm/internal/confine"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/obs"
	"cvtpm/internal/serve"
)

func init() {
	register(command{name: "ca", summary: "the EK certificate authority (gRPC enrollment API, HTTP roots and CRL)", run: runCA})
}

func runCA(ctx context.Context, args []string) error {
	if len(args) > 0 && args[0] == "revoke" {
		return runCARevoke(ctx, args[1:])
	}
	if len(args) > 0 && args[0] == "identity" {
		return runCAIdentity(ctx, args[1:])
	}
	if len(args) > 0 && args[0] == "fingerprint" {
		return runCAFingerprint(args[1:])
	}
	fs := flag.NewFlagSet("cvtpm ca", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm ca --dir DIR [options]
       cvtpm ca revoke --dir DIR SERIAL [--reason N]
       cvtpm ca identity --dir DIR --name NAME --out-cert FILE --out-key FILE [--validity 2160h]
       cvtpm ca fingerprint --dir DIR

Runs the EK CA. DIR holds one root per purpose (created on first start, of
--key-type), so that no certificate of one kind can stand in for another:

  ca.pem           EK certificates (what go-attestation, openssl and the
                   verifier's --ek-root trust for EKs)
  ak-ca.pem        AK certificates (the verifier's --ak-root; go-tpm-tools'
                   TrustedRootCerts)
  identity-ca.pem  link identities from "cvtpm ca identity" (the backend's
                   --client-ca)
  service-ca.pem   the CA service itself: its TLS certificate on --listen and
                   the key broker's answers (the backend's --broker-root);
                   clients pin it with --ca-fingerprint, which this command
                   prints at start and "cvtpm ca fingerprint" prints any time

and the certificate database (ca.db), the audit log (audit.jsonl) and the
admin socket (admin.sock, for revocation and identities). Enrollment needs a
policy (--policy, JSON; see ca/policy.go) that approves the vTPM CVM's
measurement. HTTP serves each root and CRL: /roots.pem and /crl (EK),
/roots/ak, /crl/ak, /roots/identity, /crl/identity.

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("dir", "", "CA directory (required)")
	listen := fs.String("listen", "127.0.0.1:7443", "gRPC enrollment API address: HOST:PORT, tcp:HOST:PORT or unix:PATH")
	logFlags := obs.AddLogFlags(fs)
	httpAddr := fs.String("http", "127.0.0.1:7080", "HTTP address for the roots and CRLs (/roots.pem, /crl, /crl/ak, /crl/identity; '' = off)")
	policyFile := fs.String("policy", "", "evidence policy file (JSON, required)")
	hskCEK := fs.String("hsk-cek", "", "HSK+CEK bundle for every chip (simulators, tests)")
	certDir := fs.String("cert-dir", "", "offline HSK+CEK directory per chip serial")
	keyType := fs.String("key-type", "p256", "key of a newly created CA: p256, p384, rsa3072 or sm2 (SM2 with SM3, for domestic PKIs)")
	pgConn := fs.String("postgres", "", "keep certificates in PostgreSQL (libpq connection string) instead of DIR/ca.db, for several CA replicas")
	brokerOn := fs.Bool("key-broker", false, "also serve the key broker: release vTPM backends' master and migration keys on CSV evidence (same policy), anchors in the same store")
	brokerKEK := fs.String("broker-kek", "", "hex key (32 bytes) that seals the broker's keys in the store (default DIR/broker.kek, created on first start; share it between PostgreSQL replicas)")
	tlsNames := fs.String("tls-name", "", "extra DNS names or IPs for the TLS certificate, comma-separated (the --listen host is always in it)")
	kds := fs.String("kds", "", "HYGON KDS base URL to fetch HSK+CEK from (default when neither --hsk-cek nor --cert-dir)")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *dir == "" || *policyFile == "" {
		return usageError("--dir and --policy are required (see --help)")
	}
	// It holds the CAs' signing keys and, with --key-broker, every backend's keys: processes of its user without CAP_SYS_PTRACE must
	// not read its memory (/proc/PID/mem, ptrace), nor a crash write it
	// to a core file.
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the process non-dumpable: %w", err)
	}
	log, err := logFlags.Logger(os.Stderr)
	if err != nil {
		return err
	}
	policy, err := ca.LoadPolicy(*policyFile)
	if err != nil {
		return flagError("--policy", err)
	}
	if *brokerKEK != "" && !*brokerOn {
		return usageError("--broker-kek needs --key-broker")
	}
	var certs csv.CertSource
	if *hskCEK != "" {
		if *certDir != "" || *kds != "" {
			return errors.New("--hsk-cek excludes --cert-dir and --kds")
		}
		// One pair for every chip: the report's chip serial is then
		// unchecked, so chip lists cannot be enforced.
		if len(policy.AllowChips) > 0 || len(policy.DenyChips) > 0 {
			return fmt.Errorf("--hsk-cek: %w", csv.ErrEvidenceCertsWithChipLists)
		}
		b, err := os.ReadFile(*hskCEK)
		if err != nil {
			return fmt.Errorf("--hsk-cek: %w", err)
		}
		hsk, cek, err := csv.ParseHSKCEK(b)
		if err != nil {
			return fmt.Errorf("--hsk-cek: %w", err)
		}
		certs = csv.StaticSource{HSK: hsk, CEK: cek}
	} else if certs, err = csv.SelectCertSource(*certDir, *kds, false, &policy.AppraisalPolicy); err != nil {
		return fmt.Errorf("HSK+CEK source (--cert-dir, --kds): %w", err)
	}
	// One CA per directory (its admin socket, audit log and database).
	lock, err := ownDir(*dir, "CA directory")
	if err != nil {
		return err
	}
	defer lock.Release()
	roots, err := loadOrCreateCARoots(*dir, *keyType, log)
	if err != nil {
		return flagError("--dir", err)
	}
	var store interface {
		ca.Store
		Close() error
	}
	if *pgConn != "" {
		if store, err = ca.OpenPGStore(ctx, *pgConn); err != nil {
			return flagError("--postgres", err)
		}
	} else if store, err = ca.OpenBoltStore(filepath.Join(*dir, "ca.db")); err != nil {
		return flagError("--dir", err)
	}
	defer store.Close()
	audit, err := ca.OpenAuditFile(filepath.Join(*dir, "audit.jsonl"))
	if err != nil {
		return err
	}
	defer audit.Close()
	authority := &ca.Authority{
		Policy:   policy,
		Verifier: csv.NewVerifier(csv.VerifierOptions{TrustedRoots: policy.TrustedRoots(), Certs: certs}),
		EKIssuer: roots.ek, AKIssuer: roots.ak, IdentityIssuer: roots.identity,
		TPM:   ca.TPMInfo{Manufacturer: "id:49424D00", Model: "cvtpm", Version: "id:00000001", SpecRevision: 164},
		Audit: audit, Store: store,
	}

	host, _, _ := net.SplitHostPort(strings.TrimPrefix(*listen, "tcp:"))
	tlsConf, err := ca.ServerTLS(roots.service, append([]string{host}, strings.Split(*tlsNames, ",")...), 30*24*time.Hour)
	if err != nil {
		return err
	}
	// Requests are small: a CSV report (4 KiB), an EK public area or
	// certificate, an AK's parameters.
	public := grpc.NewServer(append(serve.GRPCOptions(256<<10), grpc.Creds(credentials.NewTLS(tlsConf)))...)
	(&ca.Server{Authority: authority, Log: log}).Register(public)
	obs.RegisterHealth(public, "cvtpm.ca.v1.CA")
	if *brokerOn {
		kb, err := newKeyBroker(ctx, *dir, *brokerKEK, store, roots.service, authority, log)
		if err != nil {
			return err
		}
		kb.Register(public)
	}
	ln, err := netaddr.Listen(*listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	admin := grpc.NewServer()
	(&ca.Server{Authority: authority, Log: log, Admin: true}).Register(admin)
	sock := filepath.Join(*dir, "admin.sock")
	os.Remove(sock)
	aln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	os.Chmod(sock, 0o600)
	errc := make(chan error, 3)
	go func() { errc <- public.Serve(serve.Listen(ln, "CA gRPC", log)) }()
	go func() { errc <- admin.Serve(aln) }()
	var hs *http.Server
	httpBound := ""
	if *httpAddr != "" {
		hl, err := netaddr.Listen(*httpAddr)
		if err != nil {
			return fmt.Errorf("--http: %w", err)
		}
		httpBound = hl.Addr().String()
		// Bounded: a client that trickles or idles cannot hold connections
		// (GET only, so no body to allow for).
		mux := http.NewServeMux()
		mux.Handle("/", (&ca.Server{Authority: authority, Log: log}).HTTPHandler())
		mux.Handle("GET /metrics", obs.Handler(nil))
		obs.AddHealth(mux, func(ctx context.Context) error { _, err := store.Revoked(ctx); return err })
		hs = serve.HTTPServer(mux, 64<<10)
		go func() { errc <- hs.Serve(serve.Listen(hl, "CA HTTP", log)) }()
	}
	obs.OnHangup(ctx, log, "--policy "+*policyFile, func() error {
		p, err := ca.LoadPolicy(*policyFile)
		if err != nil {
			return err
		}
		if *hskCEK != "" && (len(p.AllowChips) > 0 || len(p.DenyChips) > 0) {
			return fmt.Errorf("--hsk-cek: %w", csv.ErrEvidenceCertsWithChipLists)
		}
		authority.SetPolicy(p, csv.NewVerifier(csv.VerifierOptions{TrustedRoots: p.TrustedRoots(), Certs: certs}))
		return nil
	})
	log.Info("EK CA serving", "grpc", ln.Addr().String(), "tls", "service-ca.pem", "http", httpBound, "admin", sock,
		"fingerprint", roots.serviceFingerprint())
	if err := obs.NotifyReady(); err != nil {
		log.Warn("systemd readiness", "err", err)
	}
	fmt.Fprintf(os.Stderr, "CA fingerprint (clients pin it with --ca-fingerprint): %s\n", roots.serviceFingerprint())
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	public.GracefulStop()
	admin.GracefulStop()
	if hs != nil {
		hs.Close()
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// caRoots are the CA's roots, one per purpose (ca.Purpose), and the
// service root that signs its TLS certificate and the key broker's answers.
type caRoots struct {
	ek, ak, identity, service *ca.Issuer
}

// caRootFiles names each root's common name (its files are
// ca.RootFileName).
var caRootFiles = []struct {
	purpose ca.Purpose
	name    string
	pick    func(*caRoots) **ca.Issuer
}{
	{ca.PurposeEK, "cvtpm EK CA", func(r *caRoots) **ca.Issuer { return &r.ek }},
	{ca.PurposeAK, "cvtpm AK CA", func(r *caRoots) **ca.Issuer { return &r.ak }},
	{ca.PurposeIdentity, "cvtpm link identity CA", func(r *caRoots) **ca.Issuer { return &r.identity }},
	{ca.PurposeService, "cvtpm CA service root", func(r *caRoots) **ca.Issuer { return &r.service }},
}

// loadOrCreateCARoots reads the CA's roots from dir, creating any that is
// missing (of keyType; the service root is always P-256) — all four on
// first start; a directory from before
// the split gains the AK, identity and service roots beside its ca.pem.
func loadOrCreateCARoots(dir, keyType string, log *slog.Logger) (caRoots, error) {
	var r caRoots
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return r, err
	}
	for _, f := range caRootFiles {
		kt := keyType
		if f.purpose == ca.PurposeService {
			// Go's TLS parses every certificate the server presents and
			// knows no SM2 key: the service root is P-256 whatever the
			// other roots are (it certifies nothing but this service).
			kt = "p256"
		}
		is, err := loadOrCreateRoot(dir, strings.TrimSuffix(ca.RootFileName(f.purpose), ".pem"), f.name, kt, log)
		if err != nil {
			return r, err
		}
		*f.pick(&r) = is
	}
	return r, nil
}

// serviceFingerprint is the SHA-256 of the service root, what clients pin
// with --ca-fingerprint.
func (r caRoots) serviceFingerprint() string { return ca.Fingerprint(r.service.DER()) }

// runCAFingerprint prints the fingerprint clients pin.
func runCAFingerprint(args []string) error {
	fs := flag.NewFlagSet("cvtpm ca fingerprint", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm ca fingerprint --dir DIR

Prints the SHA-256 fingerprint of the CA's service root (DIR/service-ca.pem):
what enroll, guest attest and the backend pin with --ca-fingerprint.

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("dir", "", "CA directory")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *dir == "" {
		return usageError("--dir is required (see --help)")
	}
	der, err := readCertFile(filepath.Join(*dir, "service-ca.pem"))
	if err != nil {
		return fmt.Errorf("--dir: %w (start the CA once to create it)", err)
	}
	fmt.Println(ca.Fingerprint(der))
	return nil
}

// loadOrCreateRoot reads DIR/base.key (PKCS #8) and DIR/base.pem,
// creating a self-signed root of keyType first if there is none.
func loadOrCreateRoot(dir, base, name, keyType string, log *slog.Logger) (*ca.Issuer, error) {
	keyPath, certPath := filepath.Join(dir, base+".key"), filepath.Join(dir, base+".pem")
	kb, err := os.ReadFile(keyPath)
	if errors.Is(err, fs.ErrNotExist) {
		if err := createRoot(keyPath, certPath, name, keyType); err != nil {
			return nil, err
		}
		log.Info("created a CA root", "name", name, "type", keyType, "cert", certPath)
		kb, err = os.ReadFile(keyPath)
	}
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	kblk, _ := pem.Decode(kb)
	if kblk == nil {
		return nil, fmt.Errorf("CA key %s: not PEM", keyPath)
	}
	cb, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	cblk, _ := pem.Decode(cb)
	if cblk == nil {
		return nil, fmt.Errorf("CA certificate %s: not PEM", certPath)
	}
	// gmsm's PKCS #8 parser reads SM2 keys as well as crypto/x509's kinds.
	parsed, err := smx509.ParsePKCS8PrivateKey(kblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CA key %s: %w", keyPath, err)
	}
	if key, ok := parsed.(*sm2.PrivateKey); ok {
		cert, err := smx509.ParseCertificate(cblk.Bytes)
		if err != nil {
			return nil, fmt.Errorf("CA certificate %s: %w", certPath, err)
		}
		return &ca.Issuer{SM2: &ca.SM2Issuer{Cert: cert, Key: key}}, nil
	}
	signer, ok := parsed.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA key %s: not a signing key", keyPath)
	}
	cert, err := x509.ParseCertificate(cblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CA certificate %s: %w", certPath, err)
	}
	return &ca.Issuer{Cert: cert, Signer: signer}, nil
}

// createRoot writes a new key and self-signed root certificate.
func createRoot(keyPath, certPath, name, keyType string) error {
	subject := pkix.Name{CommonName: name, Organization: []string{"cvtpm"}}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return err
	}
	notBefore, notAfter := time.Now().Add(-time.Hour), time.Now().AddDate(20, 0, 0)
	var der, kder []byte
	if keyType == "sm2" {
		key, err := sm2.GenerateKey(rand.Reader)
		if err != nil {
			return err
		}
		subject.CommonName += " (SM2)"
		tmpl := &smx509.Certificate{SerialNumber: serial, Subject: subject,
			NotBefore: notBefore, NotAfter: notAfter, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: smx509.KeyUsageCertSign | smx509.KeyUsageCRLSign}
		if der, err = smx509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key); err != nil {
			return err
		}
		if kder, err = smx509.MarshalPKCS8PrivateKey(key); err != nil {
			return err
		}
	} else {
		var key crypto.Signer
		switch keyType {
		case "p256":
			key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		case "p384":
			key, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
		case "rsa3072":
			key, err = rsa.GenerateKey(rand.Reader, 3072)
		default:
			return fmt.Errorf("--key-type %q: want p256, p384, rsa3072 or sm2", keyType)
		}
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{SerialNumber: serial, Subject: subject, NotBefore: notBefore, NotAfter: notAfter,
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
		if der, err = x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key); err != nil {
			return err
		}
		if kder, err = x509.MarshalPKCS8PrivateKey(key); err != nil {
			return err
		}
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func runCARevoke(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm ca revoke", flag.ContinueOnError)
	dir := fs.String("dir", "", "CA directory (its admin.sock is used)")
	reason := fs.Int("reason", 0, "RFC 5280 CRLReason code (1 = keyCompromise)")
	if done, err := parseFlagsArgs(fs, args); done {
		return err
	}
	if *dir == "" || fs.NArg() != 1 {
		return usageError("usage: cvtpm ca revoke --dir DIR [--reason N] SERIAL")
	}
	if !ca.ValidCRLReason(*reason) {
		return usageError(fmt.Sprintf("--reason %d: an RFC 5280 CRLReason is 0-10 (not 7), e.g. 1 keyCompromise", *reason))
	}
	conn, err := dialUnix("--dir", filepath.Join(*dir, "admin.sock"))
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := capb.NewCAClient(conn).Revoke(ctx, &capb.RevokeRequest{Serial: fs.Arg(0), Reason: int32(*reason)}); err != nil {
		return fmt.Errorf("revoking %s: %w", fs.Arg(0), err)
	}
	fmt.Printf("revoked %s; the next CRL lists it\n", fs.Arg(0))
	return nil
}

// runCAIdentity makes a key and CSR here and has the CA certify it over
// its admin socket: an identity for the attested link (the backend's ACL
// names the common name).
func runCAIdentity(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm ca identity", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm ca identity --dir DIR --name NAME --out-cert FILE --out-key FILE [--validity 2160h]

Creates an ECDSA P-256 key (PKCS #8 PEM, mode 0600) and a CSR for NAME, and
has the CA in DIR certify it through its admin socket. The certificate
(PEM) is for client and server authentication: e.g. a frontend's or guest
proxy's --cert, with the backend trusting DIR/ca.pem as --client-ca and its
--acl naming NAME.

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("dir", "", "CA directory (its admin.sock is used)")
	name := fs.String("name", "", "the identity: the certificate's common name")
	outCert := fs.String("out-cert", "", "where to write the certificate (PEM)")
	outKey := fs.String("out-key", "", "where to write the private key (PEM, 0600)")
	validity := fs.Duration("validity", ca.DefaultIdentityValidity, "certificate lifetime")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *dir == "" || *name == "" || *outCert == "" || *outKey == "" {
		return usageError("--dir, --name, --out-cert and --out-key are required (see --help)")
	}
	// Both files are new: an identity is never overwritten, nor issued
	// and then lost to a file that cannot be written.
	for _, f := range []struct{ flag, path string }{{"--out-cert", *outCert}, {"--out-key", *outKey}} {
		if err := checkNewFile(f.flag, f.path); err != nil {
			return err
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: *name}}, key)
	if err != nil {
		return err
	}
	conn, err := dialUnix("--dir", filepath.Join(*dir, "admin.sock"))
	if err != nil {
		return err
	}
	defer conn.Close()
	resp, err := capb.NewCAClient(conn).IssueIdentity(ctx, &capb.IssueIdentityRequest{Csr: csr, ValiditySeconds: int64(validity.Seconds())})
	if err != nil {
		return fmt.Errorf("issuing the identity %q: %w", *name, err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	if err := os.WriteFile(*outKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(*outCert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: resp.GetCertificate()}), 0o644); err != nil {
		return err
	}
	cert, _ := x509.ParseCertificate(resp.GetCertificate())
	fmt.Printf("identity %q: certificate %s (serial %s, until %s), key %s\n", *name, *outCert, cert.SerialNumber.Text(16),
		cert.NotAfter.UTC().Format(time.RFC3339), *outKey)
	return nil
}

// newKeyBroker sets up the key broker beside the CA: same evidence policy
// and verifier, same database, answers signed with the CA key.
func newKeyBroker(ctx context.Context, dir, kekFile string, store ca.Store, service *ca.Issuer, authority *ca.Authority, log *slog.Logger) (*keybroker.Broker, error) {
	if kekFile == "" {
		kekFile = filepath.Join(dir, "broker.kek")
		if _, err := os.Stat(kekFile); errors.Is(err, fs.ErrNotExist) {
			k := make([]byte, 32)
			rand.Read(k)
			if err := os.WriteFile(kekFile, []byte(hex.EncodeToString(k)+"\n"), 0o600); err != nil {
				return nil, fmt.Errorf("key broker KEK: %w", err)
			}
			log.Info("created the key broker's KEK", "file", kekFile)
		}
	}
	b, err := os.ReadFile(kekFile)
	if err != nil {
		return nil, fmt.Errorf("--broker-kek: %w", err)
	}
	kek, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(kek) != 32 {
		return nil, fmt.Errorf("--broker-kek %s: want 32 bytes in hex", kekFile)
	}
	var kbStore keybroker.Store
	switch st := store.(type) {
	case *ca.BoltStore:
		kbStore, err = keybroker.NewBoltStore(st.DB())
	case *ca.PGStore:
		kbStore, err = keybroker.NewPGStore(ctx, st.Pool())
	default:
		err = fmt.Errorf("key broker: unsupported store %T", store)
	}
	if err != nil {
		return nil, err
	}
	var signer crypto.Signer = service.Signer
	if service.SM2 != nil {
		signer = service.SM2.Key
	}
	log.Info("key broker enabled: backends' keys are released on CSV evidence that passes the policy")
	return &keybroker.Broker{Evidence: authority.EvidencePolicy, Signer: signer,
		Store: kbStore, KEK: kek, Log: log}, nil
}

// readCertFile returns the DER of the first certificate in a PEM file
// (any key type: SM2 roots included).
func readCertFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	for {
		var blk *pem.Block
		if blk, b = pem.Decode(b); blk == nil {
			return nil, fmt.Errorf("%s: no PEM certificate", path)
		}
		if blk.Type == "CERTIFICATE" {
			return blk.Bytes, nil
		}
	}
}
