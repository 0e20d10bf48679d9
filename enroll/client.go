package enroll

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"cvtpm/attest/certprofile"
	"cvtpm/attest/csv"
	"cvtpm/internal/pkisig"
)

// Request is one enrollment as the CA receives it.
type Request struct {
	InstanceID   string
	EKPublicArea []byte // TPMT_PUBLIC of the EK
	Nonce        []byte // the CA's challenge
	Report       []byte // CSV report; report_data = ReportData(Nonce, EKPublicArea, InstanceID)
}

// CA is what enrollment needs of the EK CA (in process, or a client of its
// API).
type CA interface {
	// Roots are the CA certificates (DER) EK certificates chain to; an SM2
	// CA's cannot be parsed by crypto/x509, hence DER.
	Roots(ctx context.Context) ([][]byte, error)
	Challenge(ctx context.Context) ([]byte, error)
	Enroll(ctx context.Context, req Request) (*x509.Certificate, error)
}

// EKSlot is where one EK kind lives: the TCG default template, its
// persistent handle and the NV index of its certificate (TCG EK Credential
// Profile; the places tpm2-tools and go-attestation look).
type EKSlot struct {
	Name       string
	Template   tpm2.TPMTPublic
	Persistent tpm2.TPMHandle
	CertIndex  tpm2.TPMHandle
	// Former are handles where earlier versions persisted this EK; it is
	// moved from there to Persistent.
	Former []tpm2.TPMHandle
}

// DefaultSlots are the RSA-2048 and ECC P-256 EKs, at the handles of the
// TCG registry that go-attestation and go-tpm-tools read (0x81010001,
// 0x81010002); cvtpm up to this version persisted the ECC EK at
// 0x8101000a, from where the next enrollment moves it.
var DefaultSlots = []EKSlot{
	{"RSA-2048", tpm2.RSAEKTemplate, 0x81010001, 0x01c00002, nil},
	{"ECC P-256", tpm2.ECCEKTemplate, 0x81010002, 0x01c0000a, []tpm2.TPMHandle{0x8101000a}},
}

// Client enrolls the EKs of one TPM instance.
type Client struct {
	TPM        transport.TPM
	CA         CA
	Evidence   csv.ReportProvider
	InstanceID string
}

// Result is one enrolled EK.
type Result struct {
	Slot        EKSlot
	Certificate *x509.Certificate
	Unchanged   bool // the TPM already held this certificate
}

// Enroll creates (or finds) each EK, persists it, obtains its certificate
// and writes it into NV. Running it again changes nothing the TPM already
// has: same EK, same handle; a new certificate is written only if the CA
// returns a different one.
func (c *Client) Enroll(ctx context.Context, slots []EKSlot) ([]Result, error) {
	var out []Result
	for _, slot := range slots {
		r, err := c.enrollSlot(ctx, slot)
		if err != nil {
			return out, fmt.Errorf("%s EK: %w", slot.Name, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func (c *Client) enrollSlot(ctx context.Context, slot EKSlot) (Result, error) {
	area, err := c.ensureEK(slot)
	if err != nil {
		return Result{}, err
	}
	if cert := c.currentCert(ctx, slot, area); cert != nil {
		return Result{Slot: slot, Certificate: cert, Unchanged: true}, nil
	}
	nonce, err := c.CA.Challenge(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("CA challenge: %w", err)
	}
	rd := ReportData(nonce, area, c.InstanceID)
	report, err := c.Evidence.Report(ctx, rd[:])
	if err != nil {
		return Result{}, fmt.Errorf("CSV report: %w", err)
	}
	cert, err := c.CA.Enroll(ctx, Request{InstanceID: c.InstanceID, EKPublicArea: area, Nonce: nonce, Report: report})
	if err != nil {
		return Result{}, err
	}
	if err := c.checkIssued(ctx, cert, area); err != nil {
		return Result{}, fmt.Errorf("the CA's answer is not written to NV: %w", err)
	}
	unchanged, err := c.writeCert(slot.CertIndex, cert.Raw)
	if err != nil {
		return Result{}, fmt.Errorf("writing the certificate to NV 0x%08x: %w", uint32(slot.CertIndex), err)
	}
	return Result{Slot: slot, Certificate: cert, Unchanged: unchanged}, nil
}

// checkIssued checks what the CA returned before it goes into NV: a
// certificate of the EK profile, for this EK, signed by one of the CA's EK
// roots (which come over the same authenticated channel).
func (c *Client) checkIssued(ctx context.Context, cert *x509.Certificate, area []byte) error {
	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](area)
	if err != nil {
		return err
	}
	ek, err := tpm2.Pub(*ekPub)
	if err != nil {
		return err
	}
	if k, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(ek) {
		return errors.New("the certificate is for another key than this EK")
	}
	if err := certprofile.CheckEK(cert); err != nil {
		return err
	}
	roots, err := c.CA.Roots(ctx)
	if err != nil {
		return fmt.Errorf("the CA's EK roots: %w", err)
	}
	for _, r := range roots {
		if pkisig.SignedBy(cert.Raw, r) == nil {
			return nil
		}
	}
	return errors.New("the certificate is not signed by the CA's EK root")
}

// currentCert returns the certificate already in the slot's NV index if it
// certifies this EK, chains to the CA's roots and is valid now; re-running
// enrollment then leaves the TPM and the CA untouched.
func (c *Client) currentCert(ctx context.Context, slot EKSlot, area []byte) *x509.Certificate {
	pub, err := (tpm2.NVReadPublic{NVIndex: slot.CertIndex}).Execute(c.TPM)
	if err != nil {
		return nil
	}
	nv, err := pub.NVPublic.Contents()
	if err != nil || !nv.Attributes.Written {
		return nil
	}
	der, err := c.readNV(slot.CertIndex, pub.NVName, int(nv.DataSize))
	if err != nil {
		return nil
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil
	}
	ekPub, err := tpm2.Unmarshal[tpm2.TPMTPublic](area)
	if err != nil {
		return nil
	}
	ek, err := tpm2.Pub(*ekPub)
	if err != nil {
		return nil
	}
	if k, ok := cert.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(ek) {
		return nil
	}
	roots, err := c.CA.Roots(ctx)
	if err != nil {
		return nil
	}
	// Not cert.Verify: Go refuses the TCG profile's critical SAN (it holds
	// only a directoryName, which Go leaves unhandled). Check the issuer's
	// signature and the validity window directly.
	now := time.Now()
	if now.Before(cert.NotBefore) || now.After(cert.NotAfter) {
		return nil
	}
	for _, r := range roots {
		if pkisig.SignedBy(cert.Raw, r) == nil {
			if c.revoked(ctx, cert, r) {
				return nil
			}
			return cert
		}
	}
	return nil
}

// CRLSource is implemented by CAs that publish a revocation list (ca.Client
// does); the client then does not keep a revoked certificate in NV but
// enrolls again.
type CRLSource interface {
	CRL(ctx context.Context) ([]byte, error)
}

// revoked reports whether the CA's CRL lists cert. A CRL that cannot be
// fetched or checked counts as revoked: enrolling again asks the CA, which
// knows.
func (c *Client) revoked(ctx context.Context, cert *x509.Certificate, root []byte) bool {
	src, ok := c.CA.(CRLSource)
	if !ok {
		return false
	}
	der, err := src.CRL(ctx)
	if err != nil {
		return true
	}
	revoked, err := pkisig.Revoked(der, root, cert.SerialNumber)
	return err != nil || revoked
}

// ensureEK derives the EK from the template and makes it persistent at the
// slot's handle; it returns the EK's TPMT_PUBLIC.
func (c *Client) ensureEK(slot EKSlot) ([]byte, error) {
	created, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHEndorsement,
		InPublic:      tpm2.New2B(slot.Template),
	}.Execute(c.TPM)
	if err != nil {
		return nil, fmt.Errorf("creating the EK: %w", err)
	}
	defer tpm2.FlushContext{FlushHandle: created.ObjectHandle}.Execute(c.TPM)
	area := created.OutPublic.Bytes()

	// The same EK at a former handle leaves it (the slot's handle gets it).
	for _, h := range slot.Former {
		if have, err := (tpm2.ReadPublic{ObjectHandle: h}).Execute(c.TPM); err == nil && bytes.Equal(have.OutPublic.Bytes(), area) {
			if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: h, Name: have.Name},
				PersistentHandle: h}).Execute(c.TPM); err != nil {
				return nil, fmt.Errorf("moving the EK from 0x%08x: %w", uint32(h), err)
			}
		}
	}
	if have, err := (tpm2.ReadPublic{ObjectHandle: slot.Persistent}).Execute(c.TPM); err == nil {
		if bytes.Equal(have.OutPublic.Bytes(), area) {
			return area, nil
		}
		// Something else sits at the EK's handle: replace it.
		if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: slot.Persistent, Name: have.Name},
			PersistentHandle: slot.Persistent}).Execute(c.TPM); err != nil {
			return nil, fmt.Errorf("removing the object at 0x%08x: %w", uint32(slot.Persistent), err)
		}
	}
	if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: tpm2.NamedHandle{Handle: created.ObjectHandle, Name: created.Name},
		PersistentHandle: slot.Persistent}).Execute(c.TPM); err != nil {
		return nil, fmt.Errorf("persisting the EK at 0x%08x: %w", uint32(slot.Persistent), err)
	}
	return area, nil
}

// nvChunk stays below libtpms' MAX_NV_BUFFER_SIZE.
const nvChunk = 1024

// writeCert stores der at index with the attributes swtpm_setup uses for
// EK certificates (platform-created, platform-written, readable by owner,
// platform and its own auth, no DA), unless the index already holds it.
func (c *Client) writeCert(index tpm2.TPMHandle, der []byte) (unchanged bool, err error) {
	if pub, err := (tpm2.NVReadPublic{NVIndex: index}).Execute(c.TPM); err == nil {
		cur, err := pub.NVPublic.Contents()
		if err != nil {
			return false, err
		}
		if cur.Attributes.Written && int(cur.DataSize) == len(der) {
			if have, err := c.readNV(index, pub.NVName, len(der)); err == nil && bytes.Equal(have, der) {
				return true, nil
			}
		}
		if cur.Attributes.WriteLocked {
			return false, errors.New("the index holds another certificate and is write-locked")
		}
		if _, err := (tpm2.NVUndefineSpace{AuthHandle: tpm2.TPMRHPlatform, NVIndex: tpm2.NamedHandle{Handle: index, Name: pub.NVName}}).Execute(c.TPM); err != nil {
			return false, fmt.Errorf("removing the old index: %w", err)
		}
	}
	public := tpm2.TPMSNVPublic{
		NVIndex: index,
		NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{
			PPWrite: true, WriteDefine: true, PPRead: true, OwnerRead: true, AuthRead: true,
			NoDA: true, PlatformCreate: true, NT: tpm2.TPMNTOrdinary,
		},
		DataSize: uint16(len(der)),
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHPlatform, PublicInfo: tpm2.New2B(public)}).Execute(c.TPM); err != nil {
		return false, fmt.Errorf("defining the index: %w", err)
	}
	pub, err := (tpm2.NVReadPublic{NVIndex: index}).Execute(c.TPM)
	if err != nil {
		return false, err
	}
	for off := 0; off < len(der); off += nvChunk {
		end := min(off+nvChunk, len(der))
		if _, err := (tpm2.NVWrite{
			AuthHandle: tpm2.TPMRHPlatform,
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
			Data:       tpm2.TPM2BMaxNVBuffer{Buffer: der[off:end]},
			Offset:     uint16(off),
		}).Execute(c.TPM); err != nil {
			return false, fmt.Errorf("writing at offset %d: %w", off, err)
		}
	}
	return false, nil
}

func (c *Client) readNV(index tpm2.TPMHandle, name tpm2.TPM2BName, size int) ([]byte, error) {
	var out []byte
	for off := 0; off < size; off += nvChunk {
		n := min(nvChunk, size-off)
		r, err := (tpm2.NVRead{
			AuthHandle: tpm2.NamedHandle{Handle: index, Name: name},
			NVIndex:    tpm2.NamedHandle{Handle: index, Name: name},
			Size:       uint16(n), Offset: uint16(off),
		}).Execute(c.TPM)
		if err != nil {
			return nil, err
		}
		out = append(out, r.Data.Buffer...)
	}
	return out, nil
}
