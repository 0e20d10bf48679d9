package certprofile

import (
	"crypto/x509"
	"encoding/asn1"
	"testing"
)

func TestProfiles(t *testing.T) {
	ek := &x509.Certificate{UnknownExtKeyUsage: []asn1.ObjectIdentifier{OIDEKCertificate}}
	ak := &x509.Certificate{UnknownExtKeyUsage: []asn1.ObjectIdentifier{OIDAKCertificate}}
	id := &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	both := &x509.Certificate{UnknownExtKeyUsage: []asn1.ObjectIdentifier{OIDEKCertificate}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	for _, tc := range []struct {
		name         string
		c            *x509.Certificate
		isEK, isAK   bool
		isLinkClient bool
	}{
		{"EK", ek, true, false, false},
		{"AK", ak, false, true, false},
		{"identity", id, false, false, true},
		{"EK with TLS usage too", both, false, false, false},
		{"no EKU at all", &x509.Certificate{}, false, false, true},
		{"server only", &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, false, false, false},
	} {
		if got := CheckEK(tc.c) == nil; got != tc.isEK {
			t.Errorf("%s: CheckEK %v", tc.name, CheckEK(tc.c))
		}
		if got := CheckAK(tc.c) == nil; got != tc.isAK {
			t.Errorf("%s: CheckAK %v", tc.name, CheckAK(tc.c))
		}
		if got := CheckLinkClient(tc.c) == nil; got != tc.isLinkClient {
			t.Errorf("%s: CheckLinkClient %v", tc.name, CheckLinkClient(tc.c))
		}
	}
}
