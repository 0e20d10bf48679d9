package main

// "cvtpm enroll": certify a running TPM's EKs with the EK CA.

import (
	"context"
	"flag"
	"fmt"
	"time"

	capb "cvtpm/api/ca"
	"cvtpm/attest/csv"
	"cvtpm/ca"
	"cvtpm/enroll"
	"cvtpm/internal/tpmsock"
)

func init() {
	register(command{name: "enroll", summary: "create a TPM's EKs and get their certificates from the EK CA", run: runEnroll})
}

func runEnroll(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm enroll", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm enroll --tpm-socket PATH --ca HOST:PORT --ca-fingerprint SHA256 --instance ID [--csv-sim DIR]

Creates the RSA-2048 and ECC P-256 EKs (TCG default templates) on a running
cvtpm or swtpm, persists them at 0x81010001 and 0x81010002 (the TCG registry's handles), proves with a CSV
report that they live in this CVM, and writes the certificates the CA issues
to NV 0x01c00002 and 0x01c0000a. Safe to run again. The CA is reached over
TLS and must present the service root of --ca-fingerprint; a certificate is
written to NV only if it is an EK certificate for this EK from the CA's EK
root.

Options:
`)
		fs.PrintDefaults()
	}
	sock := fs.String("tpm-socket", "", "the TPM's data socket (cvtpm/swtpm --server type=unixio,path=...)")
	tcp := fs.String("tpm-tcp", "", "the TPM's data channel on TCP instead (host:port)")
	caAddr := fs.String("ca", "127.0.0.1:7443", "the EK CA's gRPC address")
	caFingerprint := fs.String("ca-fingerprint", "", caFingerprintHelp+" (required)")
	instance := fs.String("instance", "", "this vTPM instance's id (required)")
	simDir := fs.String("csv-sim", "", "use the CSV simulator saved in DIR when /dev/csv-guest is absent")
	timeout := fs.Duration("timeout", time.Minute, "give up after this long")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *instance == "" || (*sock == "") == (*tcp == "") {
		return usageError("--instance and exactly one of --tpm-socket, --tpm-tcp are required (see --help)")
	}
	evidence, err := csv.OpenProvider(csv.ProviderOptions{SimulatorDir: *simDir})
	if err != nil && *simDir != "" {
		return flagError("--csv-sim", err)
	} else if err != nil {
		return fmt.Errorf("CSV evidence: %w (outside a CSV guest: --csv-sim DIR)", err)
	}
	conn, err := dialCA("--ca", *caAddr, *caFingerprint)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	network, addr, tpmFlag := "unix", *sock, "--tpm-socket"
	if *tcp != "" {
		network, addr, tpmFlag = "tcp", *tcp, "--tpm-tcp"
	}
	tpm, err := tpmsock.Dial(ctx, network, addr)
	if err != nil {
		return flagError(tpmFlag, err)
	}
	defer tpm.Close()
	client := &enroll.Client{TPM: tpm, CA: ca.Client{C: capb.NewCAClient(conn)}, Evidence: evidence, InstanceID: *instance}
	results, err := client.Enroll(ctx, enroll.DefaultSlots)
	for _, r := range results {
		state := "written"
		if r.Unchanged {
			state = "already there"
		}
		fmt.Printf("%-9s EK at 0x%08x: certificate serial %s from %q, NV 0x%08x %s\n", r.Slot.Name, uint32(r.Slot.Persistent),
			r.Certificate.SerialNumber.Text(16), r.Certificate.Issuer.CommonName, uint32(r.Slot.CertIndex), state)
	}
	return err
}
