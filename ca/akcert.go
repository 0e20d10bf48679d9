package ca

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"crypto/x509/pkix"
	"cvtpm/attest/certprofile"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/google/go-attestation/attest"
)

// AK certification: a TPM proves that an attestation key (AK) lives beside
// an EK this CA certified, by decrypting a credential only that EK can
// unwrap (TPM2_ActivateCredential). The CA then issues an AK certificate, so
// verifiers can trust AKs by chain (go-tpm-tools VerifyOpts.TrustedRootCerts).

// pendingAK is an activation challenge awaiting its answer.
type pendingAK struct {
	secret   []byte
	ak       *attest.AKPublic
	instance string
	ekDigest [32]byte // SHA-256 of the EK certificate the AK was activated with
}

// AKChallenge checks the AK's parameters and that ekCertDER is an
// unrevoked EK certificate of this CA, then returns a challenge id and the
// credential the TPM must activate.
func (a *Authority) AKChallenge(ctx context.Context, ekCertDER []byte, ak attest.AttestationParameters) (string, *attest.EncryptedCredential, error) {
	ekCert, err := x509.ParseCertificate(ekCertDER)
	if err != nil {
		return "", nil, refuse(ReasonBadRequest, "EK certificate: "+err.Error())
	}
	if a.AKIssuer == nil {
		return "", nil, errors.New("this CA has no AK issuer")
	}
	if a.EKIssuer == nil || a.EKIssuer.Signed(ekCert.Raw) != nil {
		return "", nil, refuse(ReasonUntrustedRoot, "the EK certificate was not issued by this CA's EK issuer")
	}
	// Only an EK certificate vouches for a TPM: a link identity (or an AK
	// certificate) of this CA names a key that may live anywhere.
	if err := certprofile.CheckEK(ekCert); err != nil {
		return "", nil, refuse(ReasonBadRequest, err.Error())
	}
	if now := a.now(); now.Before(ekCert.NotBefore) || now.After(ekCert.NotAfter) {
		return "", nil, refuse(ReasonBadRequest, "the EK certificate is not valid now")
	}
	// A TPM's AK parameters are a few hundred bytes; a pending challenge
	// must not hold more.
	if len(ak.Public) > 2048 || len(ak.CreateData) > 2048 || len(ak.CreateAttestation) > 2048 || len(ak.CreateSignature) > 2048 {
		return "", nil, refuse(ReasonBadRequest, "AK parameters larger than a TPM's")
	}
	if !hasCSVClaims(ekCert) {
		return "", nil, refuse(ReasonBadRequest, "the EK certificate carries no CSV claims: it was not issued on CSV evidence")
	}
	serial := ekCert.SerialNumber.Text(16)
	instance := ""
	if a.Store != nil {
		rec, err := a.Store.Issued(ctx, serial)
		if err != nil {
			return "", nil, refuse(ReasonBadRequest, err.Error())
		}
		if !rec.Revoked.IsZero() {
			return "", nil, refuse(ReasonRevoked, "EK certificate "+serial+" is revoked")
		}
		instance = rec.InstanceID
	}
	pub, err := attest.ParseAKPublic(ak.Public)
	if err != nil {
		return "", nil, refuse(ReasonBadRequest, "AK public area: "+err.Error())
	}
	secret, ec, err := (&attest.ActivationParameters{EK: ekCert.PublicKey, AK: ak}).Generate()
	if err != nil {
		return "", nil, refuse(ReasonBadRequest, "AK parameters: "+err.Error())
	}
	idb := make([]byte, 16)
	if _, err := rand.Read(idb); err != nil {
		return "", nil, err
	}
	id := hex.EncodeToString(idb)
	a.tables()
	if err := a.pendingAKs.Put(id, sourceOf(ctx), pendingAK{secret: secret, ak: pub, instance: instance, ekDigest: sha256.Sum256(ekCert.Raw)}); err != nil {
		return "", nil, err
	}
	return id, ec, nil
}

// AKCertify checks the activated secret for challenge id and issues the AK
// certificate. A challenge is answered once.
func (a *Authority) AKCertify(ctx context.Context, id string, secret []byte) (*x509.Certificate, error) {
	a.tables()
	p, ok, expired := a.pendingAKs.Take(id)
	entry := AuditEntry{Time: a.now().UTC(), InstanceID: p.instance, Decision: "refused"}
	var cert *x509.Certificate
	var err error
	switch {
	case expired:
		err = refuse(ReasonNonceExpired, "the AK challenge expired")
	case !ok:
		err = refuse(ReasonNonce, "unknown or already answered AK challenge")
	case subtle.ConstantTimeCompare(p.secret, secret) != 1:
		err = refuse(ReasonActivation, "the activated secret is wrong: the AK is not on the TPM of this EK")
	default:
		cert, err = a.issueAK(p)
		// Recorded like every certificate, so that it can be revoked
		// (and listed on the AK issuer's CRL).
		if err == nil && a.Store != nil {
			if perr := a.Store.PutIssued(ctx, IssuedCert{Serial: cert.SerialNumber.Text(16), InstanceID: "ak:" + p.instance, DER: cert.Raw, Issued: a.now().UTC()}); perr != nil {
				cert, err = nil, fmt.Errorf("recording the AK certificate: %w", perr)
			}
		}
	}
	var r *Refusal
	switch {
	case err == nil:
		entry.Decision, entry.Serial, entry.Reason = "issued", cert.SerialNumber.Text(16), "ak-certificate"
	case errors.As(err, &r):
		entry.Reason, entry.Detail = r.Reason, r.Detail
	default:
		entry.Reason, entry.Detail = ReasonInternalFailed, err.Error()
	}
	if aerr := a.audit(ctx, "ak", entry); aerr != nil {
		return nil, fmt.Errorf("recording the decision: %w", aerr)
	}
	return cert, err
}

func (a *Authority) issueAK(p pendingAK) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, err
	}
	now := a.now()
	ekExt, err := asn1.Marshal(p.ekDigest[:])
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "cvtpm AK " + p.instance},
		// Which EK vouched for this AK: a verifier must see that the AK
		// and the EK it is shown with belong to the same TPM.
		ExtraExtensions:       []pkix.Extension{{Id: OIDCVTPMCertifiedEK, Value: ekExt}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		UnknownExtKeyUsage:    []asn1.ObjectIdentifier{certprofile.OIDAKCertificate},
		BasicConstraintsValid: true,
	}
	cert, err := a.AKIssuer.Sign(tmpl, p.ak.Public)
	if err != nil {
		return nil, fmt.Errorf("signing the AK certificate: %w", err)
	}
	return cert, nil
}

// hasCSVClaims reports whether c carries this CA's CSV claims extension.
func hasCSVClaims(c *x509.Certificate) bool {
	for _, e := range c.Extensions {
		if e.Id.Equal(OIDCVTPMCSVClaims) {
			return true
		}
	}
	return false
}
