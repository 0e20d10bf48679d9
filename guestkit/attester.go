package guestkit

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"io"

	"github.com/google/go-attestation/attest"
	tpmtoolspb "github.com/google/go-tpm-tools/proto/attest"
	tpmpb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/tpm2/transport"
	"google.golang.org/protobuf/proto"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/csv"
	"cvtpm/attest/freshreport"
	"cvtpm/attest/workload"
)

// AKCertifier is the EK CA's AK certification (ca.Client satisfies it).
type AKCertifier interface {
	AKChallenge(ctx context.Context, ekCertDER []byte, ak attest.AttestationParameters) (string, *attest.EncryptedCredential, error)
	AKCertify(ctx context.Context, id string, secret []byte) (*x509.Certificate, error)
}

// RSAEKHandle is where enrollment persists the RSA EK; go-attestation
// activates credentials with the EK there, so the AK is certified through it.
const RSAEKHandle = 0x81010001

// Attester gathers the evidence for one verifier nonce inside the guest.
type Attester struct {
	// TPM is the vTPM: /dev/tpmrm0, or the guest proxy's socket.
	TPM transport.TPM
	// CA certifies the AK after a credential activation with the EK.
	CA AKCertifier
	// EventLog is the TCG event log of the boot (from
	// /sys/kernel/security/tpm0/binary_bios_measurements).
	EventLog []byte
	// Workload, if set, is this workload VM's own CSV firmware
	// (/dev/csv-guest, or the simulator): the evidence then carries its
	// report bound to the nonce and the AK (attest/workload), the
	// workload leg.
	Workload csv.ReportProvider
	// WorkloadHSKCEK is that chip's HSK||CEK, sent along for verifiers
	// that take the pair from the evidence (optional).
	WorkloadHSKCEK []byte
	// RawTPM, if set, opens the raw device (/dev/tpmN) for the fresh
	// report when TPM is the kernel's resource manager and refuses the
	// vendor command (Linux before 6.3).
	RawTPM func() (transport.TPMCloser, error)
}

// Gather creates an ECC AK, has the CA certify it, quotes every active
// PCR bank (SHA-256, and SHA-1 if present) with nonce, and fetches a fresh CSV report of the backend bound to the
// same nonce and the EK (attest/freshreport).
func (a *Attester) Gather(ctx context.Context, nonce []byte) (*attestpb.Evidence, error) {
	tpm, err := OpenAttestTPM(a.TPM)
	if err != nil {
		return nil, fmt.Errorf("opening the TPM: %w", err)
	}
	defer tpm.Close()
	eks, err := tpm.EKs()
	if err != nil {
		return nil, fmt.Errorf("reading the EKs: %w", err)
	}
	// go-attestation activates credentials with its first EK, the RSA EK
	// at 0x81010001 whose certificate enrollment wrote to 0x01c00002.
	var ekCert *x509.Certificate
	for _, ek := range eks {
		if _, isRSA := ek.Public.(*rsa.PublicKey); isRSA && ek.Certificate != nil {
			ekCert = ek.Certificate
			break
		}
	}
	if ekCert == nil {
		return nil, errors.New("no certified RSA EK at 0x81010001 (has the instance been enrolled?)")
	}
	ak, err := tpm.NewAK(&attest.AKConfig{Algorithm: attest.ECDSA})
	if err != nil {
		return nil, fmt.Errorf("creating the AK: %w", err)
	}
	defer ak.Close(tpm)
	params := ak.AttestationParameters()
	id, cred, err := a.CA.AKChallenge(ctx, ekCert.Raw, params)
	if err != nil {
		return nil, fmt.Errorf("AK challenge: %w", err)
	}
	secret, err := ak.ActivateCredential(tpm, *cred)
	if err != nil {
		return nil, fmt.Errorf("activating the AK credential: %w", err)
	}
	akCert, err := a.CA.AKCertify(ctx, id, secret)
	if err != nil {
		return nil, fmt.Errorf("AK certification: %w", err)
	}
	// One quote per active PCR bank (go-tpm-tools' format); SHA-256 is
	// required, SHA-1 is added when the TPM has that bank.
	att := &tpmtoolspb.Attestation{AkPub: params.Public, EventLog: a.EventLog, AkCert: akCert.Raw}
	for _, bank := range []struct {
		alg  attest.HashAlg
		hash tpmpb.HashAlgo
	}{{attest.HashSHA256, tpmpb.HashAlgo_SHA256}, {attest.HashSHA1, tpmpb.HashAlgo_SHA1}} {
		pcrs, err := tpm.PCRs(bank.alg)
		if err != nil || len(pcrs) == 0 {
			if bank.alg == attest.HashSHA256 {
				return nil, fmt.Errorf("reading the SHA-256 PCRs: %v", err)
			}
			continue
		}
		q, err := ak.Quote(tpm, nonce, bank.alg)
		if err != nil {
			return nil, fmt.Errorf("quote of the %v bank: %w", bank.hash, err)
		}
		values := map[uint32][]byte{}
		for _, p := range pcrs {
			values[uint32(p.Index)] = p.Digest
		}
		att.Quotes = append(att.Quotes, &tpmpb.Quote{Quote: q.Quote, RawSig: q.Signature, Pcrs: &tpmpb.PCRs{Hash: bank.hash, Pcrs: values}})
	}
	raw, err := proto.Marshal(att)
	if err != nil {
		return nil, err
	}
	report, hskCEK, res, err := freshreport.Get(a.TPM, nonce, RSAEKHandle)
	var re *freshreport.ResponseError
	if errors.As(err, &re) && re.RC == freshreport.RCResourceManagerCommandCode && a.RawTPM != nil {
		raw, rerr := a.RawTPM()
		if rerr != nil {
			return nil, fmt.Errorf("fresh CSV report: %w; and the raw device: %v", err, rerr)
		}
		report, hskCEK, res, err = freshreport.Get(raw, nonce, RSAEKHandle)
		raw.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("fresh CSV report from the backend: %w", err)
	}
	ev := &attestpb.Evidence{TpmAttestation: raw, EkChain: [][]byte{ekCert.Raw}, InstanceId: res.Instance,
		EkPublic: res.EKPublic, CsvReport: report, CsvHskCek: hskCEK}
	if a.Workload != nil {
		rd := workload.ReportData(nonce, params.Public)
		if ev.WorkloadReport, err = a.Workload.Report(ctx, rd[:]); err != nil {
			return nil, fmt.Errorf("this workload VM's CSV report: %w", err)
		}
		ev.WorkloadHskCek = a.WorkloadHSKCEK
	}
	return ev, nil
}

// OpenAttestTPM opens go-attestation's TPM (EKs, AKs, quotes, PCRs) on a
// go-tpm transport: Proxy.TPM's in-process link, a guest proxy's socket
// (internal/tpmsock), or /dev/tpmrm0. Closing it leaves t open.
func OpenAttestTPM(t transport.TPM) (*attest.TPM, error) {
	return attest.OpenTPM(&attest.OpenConfig{CommandChannel: newChannel(t)})
}

// channel adapts a go-tpm transport to go-attestation's command channel:
// a written command is sent, and its whole response is then read (in one
// Read, without the io.EOF that go-tpm's ToReadWriter attaches, which
// go-attestation takes for a failure). Closing go-attestation's TPM leaves
// the transport open.
type channel struct {
	t    transport.TPM
	resp *[]byte
}

func newChannel(t transport.TPM) channel { return channel{t: t, resp: new([]byte)} }

func (c channel) Write(cmd []byte) (int, error) {
	r, err := c.t.Send(cmd)
	if err != nil {
		return 0, err
	}
	*c.resp = r
	return len(cmd), nil
}

func (c channel) Read(p []byte) (int, error) {
	if len(*c.resp) == 0 {
		return 0, io.EOF
	}
	n := copy(p, *c.resp)
	*c.resp = (*c.resp)[n:]
	return n, nil
}

func (c channel) MeasurementLog() ([]byte, error) {
	return nil, errors.New("no event log on this channel")
}
func (c channel) Close() error { return nil }
