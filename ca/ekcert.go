package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"cvtpm/attest/certprofile"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"time"

	"go.step.sm/crypto/x509util"
)

// Object identifiers of the TCG EK Credential Profile (section 3.2) and of
// cvtpm's own claims extension; this is the one place that defines them.
//
// OIDCVTPMCSVClaims is PROVISIONAL: it sits under 2.999, the arc X.660
// reserves for examples, until the project registers an IANA private
// enterprise number (a 2.25 UUID arc would need 128-bit arcs, which Go's
// encoding/asn1 cannot carry in certificate extensions).
var (
	OIDTPMManufacturer   = asn1.ObjectIdentifier{2, 23, 133, 2, 1}
	OIDTPMModel          = asn1.ObjectIdentifier{2, 23, 133, 2, 2}
	OIDTPMVersion        = asn1.ObjectIdentifier{2, 23, 133, 2, 3}
	OIDTPMSpecification  = asn1.ObjectIdentifier{2, 23, 133, 2, 16}
	OIDEKCertificateEKU  = certprofile.OIDEKCertificate
	OIDSubjectAltName    = asn1.ObjectIdentifier{2, 5, 29, 17}
	OIDSubjectDirAttrs   = asn1.ObjectIdentifier{2, 5, 29, 9}
	OIDCVTPMCSVClaims    = certprofile.OIDCVTPMCSVClaims
	OIDCVTPMCertifiedEK  = certprofile.OIDCVTPMCertifiedEK
	errUnsupportedEKType = errors.New("EK public key must be RSA or ECDSA")
)

// TPMInfo is what an EK certificate says about the TPM that holds the EK:
// the TCG profile puts it in a critical subjectAltName directoryName because
// the certificate's subject is empty. Values follow the profile's form,
// e.g. Manufacturer "id:49424D00" (the TPM_PT_MANUFACTURER value in hex).
type TPMInfo struct {
	Manufacturer string
	Model        string
	Version      string
	// Spec is the TPM specification the TPM implements (family "2.0",
	// level, revision), carried in subjectDirectoryAttributes.
	SpecFamily   string
	SpecLevel    int
	SpecRevision int
}

// The CSV claims extension lives in attest/certprofile (the verifier reads
// it without importing the CA).
type CSVClaims = certprofile.CSVClaims

// MarshalCSVClaims and ParseCSVClaims: see attest/certprofile.
var (
	MarshalCSVClaims = certprofile.MarshalCSVClaims
	ParseCSVClaims   = certprofile.ParseCSVClaims
)

// EKCertificateRequest is what the CA needs to issue one EK certificate.
type EKCertificateRequest struct {
	EK       crypto.PublicKey // RSA or ECDSA public key of the EK
	TPM      TPMInfo
	Claims   *CSVClaims // nil: no claims extension
	Validity time.Duration
}

// IssueEKCertificate makes an EK certificate as swtpm_cert does (TCG EK
// Credential Profile): empty subject, critical subjectAltName directoryName
// with TPM manufacturer, model and version, critical basicConstraints
// CA:FALSE, subjectDirectoryAttributes with the TPM specification, the
// issuer's key identifier, keyUsage keyEncipherment (RSA EK) or keyAgreement
// (ECC EK), and the EK extended key usage. An EK cannot sign, so there is no
// CSR: the template is built from the public key with x509util.
func IssueEKCertificate(req EKCertificateRequest, issuer *x509.Certificate, signer crypto.Signer) (*x509.Certificate, error) {
	c, err := ekTemplate(req, issuer.SubjectKeyId)
	if err != nil {
		return nil, err
	}
	cert, err := x509util.CreateCertificate(c, issuer, req.EK, signer)
	if err != nil {
		return nil, fmt.Errorf("signing the EK certificate: %w", err)
	}
	return cert, nil
}

// ekTemplate is the EK certificate of req, unsigned; aki is the issuer's
// subject key identifier.
func ekTemplate(req EKCertificateRequest, aki []byte) (*x509.Certificate, error) {
	var keyUsage x509.KeyUsage
	switch req.EK.(type) {
	case *rsa.PublicKey:
		keyUsage = x509.KeyUsageKeyEncipherment
	case *ecdsa.PublicKey:
		keyUsage = x509.KeyUsageKeyAgreement
	default:
		return nil, errUnsupportedEKType
	}
	san, err := tpmSAN(req.TPM)
	if err != nil {
		return nil, err
	}
	sda, err := tpmSpecAttributes(req.TPM)
	if err != nil {
		return nil, err
	}
	exts := []pkix.Extension{
		{Id: OIDSubjectAltName, Critical: true, Value: san},
		{Id: OIDSubjectDirAttrs, Critical: false, Value: sda},
	}
	if req.Claims != nil {
		v, err := MarshalCSVClaims(*req.Claims)
		if err != nil {
			return nil, fmt.Errorf("encoding CSV claims: %w", err)
		}
		exts = append(exts, pkix.Extension{Id: OIDCVTPMCSVClaims, Value: v})
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, fmt.Errorf("drawing a serial number: %w", err)
	}
	validity := req.Validity
	if validity <= 0 {
		validity = 10 * 365 * 24 * time.Hour
	}
	now := time.Now()
	tmpl, err := x509util.NewCertificateFromX509(&x509.Certificate{PublicKey: req.EK, ExtraExtensions: exts})
	if err != nil {
		return nil, fmt.Errorf("EK certificate template: %w", err)
	}
	c := tmpl.GetCertificate()
	c.SerialNumber = serial
	c.NotBefore = now.Add(-time.Minute)
	c.NotAfter = now.Add(validity)
	c.KeyUsage = keyUsage
	c.ExtKeyUsage = nil // x509util's default (TLS server/client) has no place on an EK
	c.UnknownExtKeyUsage = []asn1.ObjectIdentifier{OIDEKCertificateEKU}
	c.BasicConstraintsValid = true
	c.IsCA = false
	c.AuthorityKeyId = aki
	return c, nil
}

// tpmSAN encodes GeneralNames holding one directoryName with the TPM's
// manufacturer, model and version, each in its own RDN as swtpm_cert does.
func tpmSAN(t TPMInfo) ([]byte, error) {
	if t.Manufacturer == "" || t.Model == "" || t.Version == "" {
		return nil, errors.New("EK certificate needs the TPM manufacturer, model and version")
	}
	rdns := pkix.RDNSequence{}
	for _, a := range []struct {
		oid asn1.ObjectIdentifier
		v   string
	}{{OIDTPMManufacturer, t.Manufacturer}, {OIDTPMModel, t.Model}, {OIDTPMVersion, t.Version}} {
		v, err := asn1.MarshalWithParams(a.v, "utf8")
		if err != nil {
			return nil, err
		}
		rdns = append(rdns, pkix.RelativeDistinguishedNameSET{{Type: a.oid, Value: asn1.RawValue{FullBytes: v}}})
	}
	name, err := asn1.Marshal(rdns)
	if err != nil {
		return nil, err
	}
	// directoryName [4] EXPLICIT Name, inside GeneralNames (a SEQUENCE).
	dn, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: name})
	if err != nil {
		return nil, err
	}
	return asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: dn})
}

// tpmSpecAttributes encodes subjectDirectoryAttributes with the
// TPMSpecification attribute: SEQUENCE { family UTF8String, level INTEGER,
// revision INTEGER }.
func tpmSpecAttributes(t TPMInfo) ([]byte, error) {
	family := t.SpecFamily
	if family == "" {
		family = "2.0"
	}
	spec, err := asn1.Marshal(struct {
		Family   string `asn1:"utf8"`
		Level    int
		Revision int
	}{family, t.SpecLevel, t.SpecRevision})
	if err != nil {
		return nil, err
	}
	type attribute struct {
		Type   asn1.ObjectIdentifier
		Values []asn1.RawValue `asn1:"set"`
	}
	return asn1.Marshal([]attribute{{Type: OIDTPMSpecification, Values: []asn1.RawValue{{FullBytes: spec}}}})
}
