// Package pkisig checks that a certificate was signed by an issuer, for the
// two kinds of CA cvtpm runs: crypto/x509's (ECDSA, RSA) and SM2-with-SM3
// (gmsm smx509) for domestic PKIs. Go's crypto/x509 cannot even parse an
// SM2 issuer, so code that must accept both calls SignedBy with DER.
package pkisig

import (
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"

	"github.com/emmansun/gmsm/smx509"
)

// SignedBy returns nil if certDER carries a valid signature by the key of
// issuerDER. It checks nothing else (validity, usage): callers do.
func SignedBy(certDER, issuerDER []byte) error {
	issuer, ierr := x509.ParseCertificate(issuerDER)
	if ierr == nil && issuer.PublicKeyAlgorithm != x509.UnknownPublicKeyAlgorithm {
		cert, err := x509.ParseCertificate(certDER)
		if err != nil {
			return fmt.Errorf("certificate: %w", err)
		}
		if cert.SignatureAlgorithm != x509.UnknownSignatureAlgorithm {
			return cert.CheckSignatureFrom(issuer)
		}
	}
	// An SM2 issuer (or an SM2-signed certificate): gmsm's parser.
	smIssuer, err := smx509.ParseCertificate(issuerDER)
	if err != nil {
		if ierr != nil {
			return fmt.Errorf("issuer certificate: %w", ierr)
		}
		return fmt.Errorf("issuer certificate: %w", err)
	}
	smCert, err := smx509.ParseCertificate(certDER)
	if err != nil {
		return fmt.Errorf("certificate: %w", err)
	}
	if err := smCert.CheckSignatureFrom(smIssuer); err != nil {
		return errors.Join(errors.New("not signed by this issuer"), err)
	}
	return nil
}

// Revoked reports whether crlDER, which must carry issuerDER's signature,
// lists serial.
func Revoked(crlDER, issuerDER []byte, serial *big.Int) (bool, error) {
	var revoked []*big.Int
	if issuer, err := x509.ParseCertificate(issuerDER); err == nil {
		crl, err := x509.ParseRevocationList(crlDER)
		if err != nil {
			return false, fmt.Errorf("CRL: %w", err)
		}
		if err := crl.CheckSignatureFrom(issuer); err != nil {
			return false, fmt.Errorf("CRL signature: %w", err)
		}
		for _, e := range crl.RevokedCertificateEntries {
			revoked = append(revoked, e.SerialNumber)
		}
	} else {
		issuer, err := smx509.ParseCertificate(issuerDER)
		if err != nil {
			return false, fmt.Errorf("issuer certificate: %w", err)
		}
		crl, err := smx509.ParseRevocationList(crlDER)
		if err != nil {
			return false, fmt.Errorf("CRL: %w", err)
		}
		if err := crl.CheckSignatureFrom(issuer); err != nil {
			return false, fmt.Errorf("CRL signature: %w", err)
		}
		for _, e := range crl.RevokedCertificateEntries {
			revoked = append(revoked, e.SerialNumber)
		}
	}
	for _, r := range revoked {
		if r.Cmp(serial) == 0 {
			return true, nil
		}
	}
	return false, nil
}
