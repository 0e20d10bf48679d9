package backend

import (
	"context"
	"crypto/x509"
	"fmt"
	"slices"

	"cvtpm/attest/csv"
)

// ACL authorises link clients for instances by the common name of their
// certificate (which the link has already verified against the client CA).
// It is read from a JSON file:
//
//	{"clients": {"frontend-host1": ["*"], "guest-vm1": ["vm1"]}}
//
// "*" allows every instance. A client that is not listed may use none.
type ACL struct {
	Clients map[string][]string `json:"clients"`
}

// LoadACL reads an ACL file; unknown fields are refused.
func LoadACL(path string) (*ACL, error) {
	var a ACL
	if err := csv.DecodePolicyFile(path, &a); err != nil {
		return nil, fmt.Errorf("access list: %w", err)
	}
	return &a, nil
}

// Authorize implements attestedlink.Authorizer.
func (a *ACL) Authorize(_ context.Context, client *x509.Certificate, instance string) error {
	allowed, ok := a.Clients[client.Subject.CommonName]
	if !ok {
		return fmt.Errorf("client %q is not in the access list", client.Subject.CommonName)
	}
	if slices.Contains(allowed, "*") || slices.Contains(allowed, instance) {
		return nil
	}
	return fmt.Errorf("client %q is not allowed instance %q", client.Subject.CommonName, instance)
}
