package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"cvtpm/attest/csv"
)

func init() {
	register(command{name: "csv", summary: "verify or simulate HYGON CSV attestation reports", run: runCSV})
}

const csvUsage = `Usage: cvtpm csv <subcommand> [options]

Subcommands:
  verify    check a CSV report against HYGON's root (or a given root) and print its claims
  simulate  write a report and certificate chain from a software CSV firmware

Run 'cvtpm csv <subcommand> --help' for its options.
`

func runCSV(ctx context.Context, args []string) error {
	return csvMain(ctx, args, os.Stdout, os.Stderr)
}

// csvMain is the csv command with its output streams, so tests can run it
// in process.
func csvMain(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, csvUsage)
		return exitError{2}
	}
	switch args[0] {
	case "verify":
		return csvVerify(ctx, args[1:], stdout, stderr)
	case "simulate":
		return csvSimulate(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, csvUsage)
		return nil
	}
	fmt.Fprintf(stderr, "cvtpm csv: unknown subcommand %q\n\n%s", args[0], csvUsage)
	return exitError{2}
}

func csvVerify(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("cvtpm csv verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	report := fs.String("report", "", "report file: a 2548/4096-byte v1 page or a 4116-byte wrapped v1/v2 report (required)")
	hskCEK := fs.String("hsk-cek", "", "2916-byte HSK||CEK file for the report's chip")
	certDir := fs.String("cert-dir", "", "offline certificate directory laid out as DIR/hsk_cek/<chip serial>/hsk_cek.cert (HYGON's is "+csv.DefaultCertDir+")")
	kds := fs.String("kds", "", "fetch HSK||CEK from this KDS base URL (HYGON's is "+csv.DefaultKDS+")")
	root := fs.String("root", "", "trust this 832-byte root certificate instead of the built-in HYGON HRK (results are marked simulated)")
	reportData := fs.String("report-data", "", "expected report_data as hex (at most 64 bytes, zero padded); empty skips the check")
	asJSON := fs.Bool("json", false, "print the claims as JSON")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: cvtpm csv verify --report FILE [--hsk-cek FILE | --cert-dir DIR | --kds URL] [--root FILE] [--report-data HEX] [--json]

Verifies the chain root -> HSK -> CEK -> PEK -> report (SM2/SM3), the report
MAC and, if given, report_data. Exits 0 only if everything verifies; otherwise
prints the first check that failed and exits 1.

Example:
  cvtpm csv verify --report report.cert --hsk-cek hsk_cek.cert --report-data 7573657220646174 

Options:
`)
		fs.PrintDefaults()
	}
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *report == "" {
		fmt.Fprintln(stderr, "cvtpm csv verify: --report is required (see --help)")
		return exitError{2}
	}
	sources := 0
	for _, s := range []string{*hskCEK, *certDir, *kds} {
		if s != "" {
			sources++
		}
	}
	if sources != 1 {
		fmt.Fprintln(stderr, "cvtpm csv verify: give exactly one of --hsk-cek, --cert-dir, --kds")
		return exitError{2}
	}
	bad := func(format string, a ...any) error {
		fmt.Fprintf(stderr, "cvtpm csv verify: "+format+"\n", a...)
		return exitError{1}
	}
	var opts csv.VerifierOptions
	switch {
	case *hskCEK != "":
		b, err := os.ReadFile(*hskCEK)
		if err != nil {
			return bad("--hsk-cek: %v", err)
		}
		hsk, cek, err := csv.ParseHSKCEK(b)
		if err != nil {
			return bad("--hsk-cek %s: %v", *hskCEK, err)
		}
		opts.Certs = csv.StaticSource{HSK: hsk, CEK: cek}
	case *certDir != "":
		opts.Certs = csv.DirSource{Dir: *certDir}
	default:
		opts.Certs = &csv.CachedSource{Source: csv.HTTPSource{BaseURL: *kds, Timeout: 15 * time.Second}, TTL: time.Hour}
	}
	if *root != "" {
		b, err := os.ReadFile(*root)
		if err != nil {
			return bad("--root: %v", err)
		}
		r, err := csv.ParseRoot(b)
		if err != nil {
			return bad("--root %s: %v", *root, err)
		}
		opts.TrustedRoots = []*csv.CACert{r}
	}
	var want []byte
	if *reportData != "" {
		var err error
		if want, err = hex.DecodeString(*reportData); err != nil || len(want) > 64 {
			return bad("--report-data must be at most 64 bytes of hex")
		}
	}
	rep, err := os.ReadFile(*report)
	if err != nil {
		return bad("--report: %v", err)
	}
	claims, err := csv.NewVerifier(opts).Verify(ctx, rep, want)
	if err != nil {
		var ce *csv.CheckError
		if errors.As(err, &ce) {
			return bad("FAILED at check %q: %v", ce.Check, ce.Err)
		}
		return bad("FAILED: %v", err)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(claims)
	}
	printClaims(stdout, claims)
	return nil
}

func printClaims(w io.Writer, c *csv.Claims) {
	status := "OK (genuine HYGON root)"
	if c.Simulated {
		status = "OK (SIMULATED root: not evidence of a real CSV VM)"
	}
	p := c.Policy
	fmt.Fprintf(w, "verified:           %s\n", status)
	fmt.Fprintf(w, "root:               %s (sm3 %s)\n", c.Root.Name, c.Root.Fingerprint)
	fmt.Fprintf(w, "version:            %d\n", c.Version)
	fmt.Fprintf(w, "chip serial:        %s\n", c.ChipSerial)
	fmt.Fprintf(w, "firmware (PEK):     %s\n", c.Firmware)
	fmt.Fprintf(w, "policy:             %#08x nodbg=%v noks=%v es=%v nosend=%v domain=%v csv=%v csv3=%v asid_reuse=%v hsk_version=%d cek_version=%d api=%d.%d\n",
		p.Raw, p.NoDebug, p.NoKeyShare, p.ES, p.NoSend, p.Domain, p.CSV, p.CSV3, p.ASIDReuse, p.HSKVersion, p.CEKVersion, p.APIMajor, p.APIMinor)
	fmt.Fprintf(w, "measure:            %x\n", []byte(c.Measure))
	fmt.Fprintf(w, "report_data:        %x\n", []byte(c.ReportData))
	fmt.Fprintf(w, "mnonce:             %x\n", []byte(c.MNonce))
	fmt.Fprintf(w, "vm_id:              %x\n", []byte(c.VMID))
	fmt.Fprintf(w, "vm_version:         %x\n", []byte(c.VMVersion))
	fmt.Fprintf(w, "user_pubkey_digest: %x\n", []byte(c.UserPubKeyDigest))
	if c.Version == 2 {
		fmt.Fprintf(w, "build:              %d\n", c.Build)
		fmt.Fprintf(w, "rtmr_version:       %d\n", c.RTMRVersion)
		for i, r := range c.RTMRs {
			fmt.Fprintf(w, "rtmr%d:              %x\n", i, []byte(r))
		}
	}
}

func csvSimulate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("cvtpm csv simulate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "directory for the simulated chip and report (required; reused if it already holds a simulator)")
	reportData := fs.String("report-data", "", "report_data as hex (at most 64 bytes, zero padded)")
	measure := fs.String("measure", "", "launch measurement as hex (32 bytes); default all zero")
	policy := fs.String("policy", "0x1", "guest policy word (hex), e.g. 0x1 = NODBG")
	version := fs.Int("version", 1, "report version: 1 (CSV/CSV2) or 2 (CSV3, with RTMRs)")
	chip := fs.String("chip", "SIMCHIP0001", "chip serial of a newly created simulator")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), `Usage: cvtpm csv simulate --out DIR [--report-data HEX] [--measure HEX] [--policy HEX] [--version 1|2]

Runs a software CSV firmware with its own root (never HYGON's) and writes:
  DIR/report.cert   the report
  DIR/hrk.cert      the simulator's root certificate
  DIR/hsk_cek.cert  the chip's HSK||CEK
  DIR/sim.json      the simulator's private keys and guest config (mode 0600)
Verify with:
  cvtpm csv verify --report DIR/report.cert --hsk-cek DIR/hsk_cek.cert --root DIR/hrk.cert

Options:
`)
		fs.PrintDefaults()
	}
	if done, err := parseFlags(fs, args); done {
		return err
	}
	bad := func(format string, a ...any) error {
		fmt.Fprintf(stderr, "cvtpm csv simulate: "+format+"\n", a...)
		return exitError{1}
	}
	if *out == "" {
		fmt.Fprintln(stderr, "cvtpm csv simulate: --out is required (see --help)")
		return exitError{2}
	}
	rd, err := hex.DecodeString(*reportData)
	if err != nil || len(rd) > 64 {
		return bad("--report-data must be at most 64 bytes of hex")
	}
	pol, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(*policy), "0x"), 16, 32)
	if err != nil {
		return bad("--policy %q: want a 32-bit hex number", *policy)
	}
	sim, err := csv.LoadSimulator(*out)
	if errors.Is(err, os.ErrNotExist) {
		sim, err = csv.NewSimulator(*chip)
	}
	if err != nil {
		return bad("--out: %v", err)
	}
	vm := sim.VM()
	vm.Version, vm.Policy = *version, uint32(pol)
	if *measure != "" {
		m, err := hex.DecodeString(*measure)
		if err != nil || len(m) != 32 {
			return bad("--measure must be 32 bytes of hex")
		}
		copy(vm.Measure[:], m)
	}
	if *version == 2 && vm.Build == 0 {
		vm.Build, vm.RTMRVersion = 2337, 1
	}
	if err := sim.SetVM(vm); err != nil {
		return bad("%v", err)
	}
	if err := sim.Save(*out); err != nil {
		return bad("--out: %v", err)
	}
	rep, err := sim.Report(ctx, rd)
	if err != nil {
		return bad("%v", err)
	}
	path := filepath.Join(*out, "report.cert")
	if err := os.WriteFile(path, rep, 0o644); err != nil {
		return bad("%v", err)
	}
	fmt.Fprintf(stdout, "wrote %s (v%d, %d bytes, chip %s) and its chain in %s\n", path, vm.Version, len(rep), sim.ChipSerial, *out)
	return nil
}
