package ca

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"time"

	"go.step.sm/crypto/x509util"
)

// Link identities: certificates for the attested link's clients (the host
// frontend, guest proxies) and for anything else that authenticates with a
// key it holds. Unlike an EK, such a key can sign a CSR, so issuance starts
// from one: the CSR's signature proves possession, its subject's common
// name is the identity the backend's access list names. Served only on the
// CA's admin socket: who gets an identity is the operator's decision.

// DefaultIdentityValidity is how long an identity certificate lives unless
// asked otherwise.
const DefaultIdentityValidity = 90 * 24 * time.Hour

// IssueIdentity checks csr and issues a client+server certificate for its
// common name (and SANs), recording the decision in the audit log.
func (a *Authority) IssueIdentity(ctx context.Context, csr *x509.CertificateRequest, validity time.Duration) (*x509.Certificate, error) {
	cert, err := a.issueIdentity(csr, validity)
	entry := AuditEntry{Time: a.now().UTC(), InstanceID: "identity:" + csr.Subject.CommonName, Decision: "issued"}
	if err != nil {
		entry.Decision, entry.Reason, entry.Detail = "refused", ReasonBadRequest, err.Error()
	} else {
		entry.Serial = cert.SerialNumber.Text(16)
		if a.Store != nil {
			if perr := a.Store.PutIssued(ctx, IssuedCert{Serial: entry.Serial, InstanceID: entry.InstanceID, DER: cert.Raw, Issued: a.now()}); perr != nil {
				return nil, fmt.Errorf("storing the identity certificate: %w", perr)
			}
		}
	}
	if aerr := a.audit(ctx, "identity", entry); aerr != nil {
		return nil, fmt.Errorf("recording the decision: %w", aerr)
	}
	return cert, err
}

func (a *Authority) issueIdentity(csr *x509.CertificateRequest, validity time.Duration) (*x509.Certificate, error) {
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("CSR signature: %w", err)
	}
	if csr.Subject.CommonName == "" {
		return nil, errors.New("the CSR has no common name: it is the identity the backend's access list names")
	}
	if validity <= 0 {
		validity = DefaultIdentityValidity
	}
	if validity > 2*365*24*time.Hour {
		return nil, fmt.Errorf("validity %v is longer than two years", validity)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, err
	}
	c, err := x509util.NewCertificate(csr, x509util.WithTemplate(x509util.DefaultLeafTemplate, x509util.CreateTemplateData(csr.Subject.CommonName, csr.DNSNames)))
	if err != nil {
		return nil, fmt.Errorf("certificate template: %w", err)
	}
	tmpl := c.GetCertificate()
	now := a.now()
	tmpl.SerialNumber = serial
	tmpl.Subject = pkix.Name{CommonName: csr.Subject.CommonName}
	tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Minute), now.Add(validity)
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}
	tmpl.URIs, tmpl.IPAddresses, tmpl.EmailAddresses = csr.URIs, csr.IPAddresses, csr.EmailAddresses
	if a.IdentityIssuer == nil {
		return nil, errors.New("this CA has no identity issuer")
	}
	cert, err := a.IdentityIssuer.Sign(tmpl, csr.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("signing the identity certificate: %w", err)
	}
	return cert, nil
}
