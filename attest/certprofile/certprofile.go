// Package certprofile tells the certificates of cvtpm's CA apart by their
// extended key usage, so that one can never stand in for another: an EK
// certificate (TCG EK profile, EKU 2.23.133.8.1 only), an AK certificate
// (TCG AK EKU 2.23.133.8.3) and a link identity (TLS client/server auth).
// The CA issues them with these EKUs; the CA's AK certification, the
// verifier and the attested link check them.
package certprofile

import (
	"crypto/x509"
	"encoding/asn1"
	"fmt"
	"slices"
)

// The TCG extended key usages.
var (
	OIDEKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 1}
	OIDAKCertificate = asn1.ObjectIdentifier{2, 23, 133, 8, 3}
)

func hasUnknownEKU(c *x509.Certificate, oid asn1.ObjectIdentifier) bool {
	return slices.ContainsFunc(c.UnknownExtKeyUsage, func(o asn1.ObjectIdentifier) bool { return o.Equal(oid) })
}

// CheckEK returns an error unless c has the EK profile: EKU 2.23.133.8.1
// and no other usage, not a CA.
func CheckEK(c *x509.Certificate) error {
	switch {
	case !hasUnknownEKU(c, OIDEKCertificate):
		return fmt.Errorf("not an EK certificate: no EKU %v", OIDEKCertificate)
	case len(c.ExtKeyUsage) > 0 || len(c.UnknownExtKeyUsage) != 1:
		return fmt.Errorf("not an EK certificate: other extended key usages besides %v", OIDEKCertificate)
	case c.IsCA:
		return fmt.Errorf("not an EK certificate: a CA certificate")
	}
	return nil
}

// CheckAK returns an error unless c has the AK profile: EKU 2.23.133.8.3,
// no TLS or other usage, not a CA.
func CheckAK(c *x509.Certificate) error {
	switch {
	case !hasUnknownEKU(c, OIDAKCertificate):
		return fmt.Errorf("not an AK certificate: no EKU %v", OIDAKCertificate)
	case len(c.ExtKeyUsage) > 0 || len(c.UnknownExtKeyUsage) != 1:
		return fmt.Errorf("not an AK certificate: other extended key usages besides %v", OIDAKCertificate)
	case c.IsCA:
		return fmt.Errorf("not an AK certificate: a CA certificate")
	}
	return nil
}

// CheckLinkClient returns an error if c is an EK or AK certificate: those
// name TPM keys and must never authenticate a link session.
func CheckLinkClient(c *x509.Certificate) error {
	if hasUnknownEKU(c, OIDEKCertificate) || hasUnknownEKU(c, OIDAKCertificate) {
		return fmt.Errorf("an EK or AK certificate is not a link identity")
	}
	if !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) && !slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageAny) && len(c.ExtKeyUsage) > 0 {
		return fmt.Errorf("certificate not for TLS client authentication")
	}
	return nil
}
