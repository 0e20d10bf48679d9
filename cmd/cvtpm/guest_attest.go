package main

// "cvtpm guest attest": evidence from inside the guest to the verifier.

import (
	"context"
	"crypto/subtle"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	attestpb "cvtpm/api/attest"
	capb "cvtpm/api/ca"
	"cvtpm/attest/ear"
	"cvtpm/ca"
	"cvtpm/guestkit"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/confine"
	"cvtpm/internal/gcm"
	"cvtpm/internal/netaddr"
	"cvtpm/internal/tpmsock"
)

const defaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"

func runGuestAttest(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm guest attest", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm guest attest --tpm TPM --ca HOST:PORT --ca-fingerprint SHA256 --verifier HOST:PORT
                          --verifier-key FILE [options]

Runs inside the workload VM. Gets a nonce from the verifier, creates an ECC
AK and has the EK CA certify it (credential activation with the enrolled
RSA EK), quotes the SHA-256 PCRs, asks the vTPM's backend for a fresh CSV
report bound to the same nonce and the EK (a vendor TPM command), sends it
all to the verifier and prints the verdict. The verdict counts only if it
is signed by --verifier-key and answers this run (its nonce, this TPM's EK,
the digest of the evidence sent, issued now): the network to the verifier is
the host's. Exit status 0:
every part affirming (or warning); 3: refused; 1: no valid verdict.

  --tpm /dev/tpmrm0          the kernel's TPM (through QEMU and the frontend)
  --tpm unix:PATH | tcp:HOST:PORT   a guest proxy's (or any swtpm) data socket
  --link ADDR --instance ID --tls-cert FILE --tls-key FILE --policy FILE
                             no guest proxy: attest the backend through the
                             host's relay (vsock:2:PORT in a VM) and use the
                             instance over the attested link from this
                             process (as 'cvtpm guest proxy' would; with
                             --workload-evidence the session proves the
                             workload VM too)

Options:
`)
		fs.PrintDefaults()
	}
	tpmAddr := fs.String("tpm", "/dev/tpmrm0", "the TPM: a device path, unix:PATH or tcp:HOST:PORT")
	caAddr := fs.String("ca", "127.0.0.1:7443", "EK CA gRPC address (AK certification)")
	caFingerprint := fs.String("ca-fingerprint", "", caFingerprintHelp+" (required)")
	verifierAddr := fs.String("verifier", "127.0.0.1:7800", "verifier gRPC address")
	eventLog := fs.String("event-log", defaultEventLog, "TCG event log of this boot")
	verifierKey := fs.String("verifier-key", "", "the verifier's public key (PEM, its --token-key's KEY.pub.pem): the token must be signed by it (required)")
	asJSON := fs.Bool("json", false, "print the token's claims as JSON")
	workload := fs.Bool("workload-evidence", false, "add this workload VM's own CSV report (/dev/csv-guest), bound to the nonce and the AK: the verdict's third leg")
	workloadSim := fs.String("workload-csv-sim", "", "with --workload-evidence: the CSV simulator in DIR when /dev/csv-guest is absent (tests, demos)")
	workloadHSKCEK := fs.String("workload-hsk-cek", "", "with --workload-evidence: this VM's chip HSK+CEK bundle, for verifiers that take it from the evidence")
	timeout := fs.Duration("timeout", time.Minute, "give up after this long")
	linkAddr := fs.String("link", "", "instead of --tpm: the relay (or backend) address of the attested link, vsock:CID:PORT, tcp:HOST:PORT or unix:PATH")
	instance := fs.String("instance", "", "with --link: the backend instance (required with --link)")
	direct := fs.String("direct", gcm.AES256, "with --link: ordinary TPM commands through a session the backend hands to the instance's worker, sealed with this cipher ("+gcm.AES256+" or "+gcm.SM4+"); \"off\": everything through the supervisor")
	link := addLinkFlags(fs)
	if done, err := parseFlags(fs, args); done {
		return err
	}
	// With --link it holds the link identity's key and the sessions'
	// keys, as the guest proxy does; it is non-dumpable for the same
	// reason (before any key is read).
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the process non-dumpable: %w", err)
	}
	tpmGiven, linkOnly := false, link.given(fs)
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "tpm":
			tpmGiven = true
		case "instance", "direct":
			linkOnly = f.Name
		}
	})
	cipher, err := directCipher(*direct)
	if err != nil {
		return err
	}
	var linkCfg attestedlink.ClientConfig
	switch {
	case *linkAddr == "" && linkOnly != "":
		return usageError("--" + linkOnly + " needs --link")
	case *linkAddr != "" && tpmGiven:
		return usageError("give --tpm or --link, not both")
	case *linkAddr != "":
		if *instance == "" {
			return usageError("--link needs --instance")
		}
		if err := netaddr.Check(*linkAddr); err != nil {
			return flagError("--link", err)
		}
		if linkCfg, err = link.load(); err != nil {
			return err
		}
	}
	started := time.Now()
	if *caFingerprint == "" || *verifierKey == "" {
		return usageError("--ca-fingerprint and --verifier-key are required (see --help)")
	}
	// Everything the command line names is checked before the TPM or the
	// network is touched.
	verifierPub, err := readPublicKey(*verifierKey)
	if err != nil {
		return fmt.Errorf("--verifier-key: %w", err)
	}
	logBytes, err := os.ReadFile(*eventLog)
	if err != nil {
		return fmt.Errorf("--event-log: %w", err)
	}
	caConn, err := dialCA("--ca", *caAddr, *caFingerprint)
	if err != nil {
		return err
	}
	defer caConn.Close()
	vConn, err := dialGRPC("--verifier", *verifierAddr)
	if err != nil {
		return err
	}
	defer vConn.Close()
	a := &guestkit.Attester{CA: ca.Client{C: capb.NewCAClient(caConn)}, EventLog: logBytes}
	if *workload {
		if a.Workload, a.WorkloadHSKCEK, err = workloadEvidence(*workloadSim, *workloadHSKCEK, slog.New(slog.NewTextHandler(os.Stderr, nil))); err != nil {
			return err
		}
		if *linkAddr != "" && a.WorkloadHSKCEK == nil {
			// As the guest proxy: the backend checks a bound workload's
			// report with the pair the session sends.
			return errors.New("--workload-evidence with --link on a real CSV guest needs --workload-hsk-cek (the chip's HSK+CEK bundle)")
		}
	} else if *workloadSim != "" || *workloadHSKCEK != "" {
		return usageError("--workload-csv-sim and --workload-hsk-cek need --workload-evidence")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	var tpm transport.TPMCloser
	if *linkAddr != "" {
		// The session proves the workload VM with the same report
		// provider as the evidence's workload leg.
		linkCfg.Workload, linkCfg.WorkloadHSKCEK = a.Workload, a.WorkloadHSKCEK
		tpm, err = openLinkTPM(ctx, &guestkit.Proxy{Link: *linkAddr, Instance: *instance, Config: linkCfg, Direct: cipher,
			Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	} else {
		tpm, err = openGuestTPM(ctx, *tpmAddr)
	}
	if err != nil {
		return err
	}
	defer tpm.Close()
	a.TPM = tpm
	if raw, ok := strings.CutPrefix(*tpmAddr, "/dev/tpmrm"); ok && *linkAddr == "" {
		// Linux before 6.3 passes no vendor command through its resource
		// manager: the fresh report then goes through /dev/tpmN.
		a.RawTPM = func() (transport.TPMCloser, error) { return openGuestTPM(ctx, "/dev/tpm"+raw) }
	}
	vc := attestpb.NewVerifierClient(vConn)
	ch, err := vc.Challenge(ctx, &attestpb.ChallengeRequest{})
	if err != nil {
		return fmt.Errorf("verifier challenge: %w", err)
	}
	ev, err := a.Gather(ctx, ch.GetNonce())
	if err != nil {
		return err
	}
	resp, err := vc.Attest(ctx, &attestpb.AttestRequest{Nonce: ch.GetNonce(), Evidence: ev})
	if err != nil {
		return fmt.Errorf("verifier: %w", err)
	}
	result, err := ear.Parse(resp.GetEar(), verifierPub)
	if err != nil {
		return fmt.Errorf("the verifier's token: %w", err)
	}
	// The channel to the verifier is the host's: a signed token is only an
	// answer to this attestation if it carries this challenge's nonce, the
	// digest of the evidence sent and this TPM's EK, and was issued now.
	if err := answersThis(result, ch.GetNonce(), ev, started); err != nil {
		return fmt.Errorf("the verifier's token does not answer this attestation: %w", err)
	}
	if *asJSON {
		b, _ := json.MarshalIndent(result, "", "  ")
		fmt.Println(string(b))
	} else {
		printVerdict(result)
	}
	if !result.Passes() {
		return exitError{3}
	}
	return nil
}

// tokenMaxSkew bounds how far a token's issue time may lie from this
// run's, both ways (clocks of guest and verifier differ a little).
const tokenMaxSkew = 5 * time.Minute

// answersThis checks that a signed token is the verifier's answer to this
// run: this challenge's nonce, the evidence this run sent, the EK
// certificate this TPM sent, and an issue time within this run. Without it a relay between the guest and
// the verifier could answer with any earlier (affirming) token.
func answersThis(t *ear.EAR, nonce []byte, ev *attestpb.Evidence, started time.Time) error {
	want := base64.RawURLEncoding.EncodeToString(nonce)
	if subtle.ConstantTimeCompare([]byte(t.Nonce), []byte(want)) != 1 {
		return errors.New("it carries another challenge's nonce (a replayed token)")
	}
	// The verdict is about the evidence the verifier received: it must be
	// the evidence this run sent, not other evidence (its workload leg
	// stripped, another quote) a relay sent with this nonce.
	if t.EvidenceDigest != ear.EvidenceDigest(ev) {
		return errors.New("it judged other evidence than this TPM sent (changed on the way to the verifier)")
	}
	issued := time.Unix(t.IssuedAt, 0)
	if issued.Before(started.Add(-tokenMaxSkew)) || issued.After(time.Now().Add(tokenMaxSkew)) {
		return fmt.Errorf("issued at %s, not during this run (%s)", issued.UTC().Format(time.RFC3339), started.UTC().Format(time.RFC3339))
	}
	if len(ev.GetEkChain()) == 0 {
		return nil
	}
	ek, err := x509.ParseCertificate(ev.GetEkChain()[0])
	if err != nil {
		return nil // the verifier judged it; nothing to compare with
	}
	if got, _ := t.Submods["cvtpm-vtpm"].Evidence["ek_serial"].(string); got != "" && got != ek.SerialNumber.Text(16) {
		return fmt.Errorf("it is about EK certificate %s, this TPM's is %s", got, ek.SerialNumber.Text(16))
	}
	return nil
}

// legs names the EAR submodules as a reader knows them, in the order the
// verdict is read: the TPM, its backend, the workload VM.
var legs = []struct{ submod, name string }{
	{"cvtpm-vtpm", "vTPM quote"},
	{"csv-platform", "vTPM backend (CSV)"},
	{"csv-workload", "workload VM (CSV)"},
}

func printVerdict(result *ear.EAR) {
	fmt.Printf("verifier result (EAR token, signature verified):\n")
	fmt.Printf("  %-20s %-16s %s\n", "leg", "status", "reasons")
	shown := map[string]bool{}
	row := func(name, submod string) {
		s, ok := result.Submods[submod]
		if !ok {
			return
		}
		shown[submod] = true
		fmt.Printf("  %-20s %-16s %s\n", name, strings.ToUpper(s.Status), strings.Join(s.Reasons, ", "))
	}
	for _, l := range legs {
		row(l.name, l.submod)
	}
	var others []string
	for n := range result.Submods {
		if !shown[n] {
			others = append(others, n)
		}
	}
	sort.Strings(others)
	for _, n := range others { // a custom policy's submodules
		row(n, n)
	}
	if _, ok := result.Submods["csv-workload"]; !ok {
		fmt.Printf("  %-20s %-16s %s\n", legs[2].name, "-", "not sent (--workload-evidence) and not required")
	}
	// What was verified; a leg whose evidence did not verify has nothing
	// to show but its reasons above.
	if v := result.Submods["cvtpm-vtpm"].Evidence; v != nil && v["ek_serial"] != "" && v["ek_serial"] != nil {
		fmt.Printf("  vTPM: EK certificate serial %v\n", v["ek_serial"])
	}
	if c := result.Submods["csv-platform"].Evidence; c != nil && c["measurement"] != "" && c["measurement"] != nil {
		fmt.Printf("  backend: chip %v, measurement %v, instance %v, simulated %v\n", c["chip_serial"], c["measurement"], c["instance"], c["simulated"])
	}
	if w := result.Submods["csv-workload"].Evidence; w != nil && w["measurement"] != "" {
		fmt.Printf("  workload VM: chip %v, measurement %v, simulated %v\n", w["chip_serial"], w["measurement"], w["simulated"])
	}
}

func openGuestTPM(ctx context.Context, addr string) (transport.TPMCloser, error) {
	var t transport.TPMCloser
	var err error
	switch {
	case strings.HasPrefix(addr, "unix:"):
		t, err = tpmsock.Dial(ctx, "unix", strings.TrimPrefix(addr, "unix:"))
	case strings.HasPrefix(addr, "tcp:"):
		t, err = tpmsock.Dial(ctx, "tcp", strings.TrimPrefix(addr, "tcp:"))
	default:
		t, err = linuxtpm.Open(addr)
	}
	if err != nil {
		return nil, fmt.Errorf("--tpm %s: %w", addr, err)
	}
	return t, nil
}

// openLinkTPM connects p (attesting the backend) and returns its TPM: the
// instance over the attested link in this process, closed with p.
func openLinkTPM(ctx context.Context, p *guestkit.Proxy) (transport.TPMCloser, error) {
	if _, err := p.Connect(ctx); err != nil {
		return nil, fmt.Errorf("--link %s: %w", p.Link, err)
	}
	return linkTPM{p.TPM(), p}, nil
}

type linkTPM struct {
	transport.TPM
	p *guestkit.Proxy
}

func (t linkTPM) Close() error { return t.p.Close() }

func readPublicKey(path string) (any, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New(path + ": not PEM")
	}
	return x509.ParsePKIXPublicKey(blk.Bytes)
}

func runGuestMeasure(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm guest measure", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm guest measure --tpm TPM --event-log FILE [--pcr N] TEXT...

Measures each TEXT the way a bootloader measures what it loads: extends PCR
N (default 16) with its SHA-256 and appends an EV_IPL event to the TCG event
log FILE (created with its header if missing), so that 'cvtpm guest attest
--event-log FILE' can prove it.

Options:
`)
		fs.PrintDefaults()
	}
	tpmAddr := fs.String("tpm", "/dev/tpmrm0", "the TPM: a device path, unix:PATH or tcp:HOST:PORT")
	logFile := fs.String("event-log", "", "the event log file to append to (required)")
	pcr := fs.Uint("pcr", 16, "PCR to extend")
	if done, err := parseFlagsArgs(fs, args); done {
		return err
	}
	if *pcr > 23 {
		return usageError(fmt.Sprintf("--pcr %d: a PCR is 0-23", *pcr))
	}
	if *logFile == "" || fs.NArg() == 0 {
		fs.Usage()
		return exitError{2}
	}
	var el *guestkit.EventLog
	switch b, err := os.ReadFile(*logFile); {
	case err == nil:
		if el, err = guestkit.ContinueEventLog(b); err != nil {
			return fmt.Errorf("--event-log %s: %w", *logFile, err)
		}
	case errors.Is(err, os.ErrNotExist):
		el = guestkit.NewEventLog()
	default:
		return fmt.Errorf("--event-log: %w", err)
	}
	tpm, err := openGuestTPM(ctx, *tpmAddr)
	if err != nil {
		return err
	}
	defer tpm.Close()
	for _, text := range fs.Args() {
		if err := el.Measure(tpm, uint32(*pcr), guestkit.EventIPL, []byte(text)); err != nil {
			return err
		}
		// Written after every event: the log never lags behind the PCR.
		if err := os.WriteFile(*logFile, el.Bytes(), 0o644); err != nil {
			return fmt.Errorf("--event-log: %w", err)
		}
		fmt.Printf("measured %q into PCR %d\n", text, *pcr)
	}
	return nil
}
