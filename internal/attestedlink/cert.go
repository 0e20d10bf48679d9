package attestedlink

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"time"

	"cvtpm/attest/csv"
)

// EphemeralCertificate makes a fresh self-signed P-256 certificate for a
// backend. It needs no issuer: clients trust the backend because its CSV
// report commits to the session's exporter, which covers this key.
func EphemeralCertificate() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "cvtpm backend (attested by CSV evidence)"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("ephemeral certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// LoadClientConfig reads a client's identity (certificate and key PEM, as
// "cvtpm ca identity" writes them) and its evidence policy (a JSON
// csv.AppraisalPolicy).
func LoadClientConfig(certFile, keyFile, policyFile string) (ClientConfig, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return ClientConfig{}, fmt.Errorf("link identity: %w", err)
	}
	policy, err := csv.LoadAppraisalPolicy(policyFile)
	if err != nil {
		return ClientConfig{}, fmt.Errorf("backend evidence policy: %w", err)
	}
	return ClientConfig{Certificate: cert, Policy: policy}, nil
}
