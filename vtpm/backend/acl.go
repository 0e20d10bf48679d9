package backend

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"slices"
	"sync/atomic"

	"cvtpm/attest/csv"
	"cvtpm/vtpm/tpmrpc"
)

// ACL authorises link clients by the common name of their certificate
// (which the link has already verified against the client CA): which
// instances each may use, and what it may do with them. It is read from a
// JSON file:
//
//	{"clients": {
//	  "frontend-host1": {"instances": ["*"],   "capabilities": ["host"]},
//	  "guest-vm1":      {"instances": ["vm1"], "capabilities": ["guest"]}}}
//
// "*" allows every instance. Capabilities are role or capability names
// (tpmrpc.ParseCapabilities): "host" is what QEMU's TPM through the
// frontend needs (commands at localities 0-3, reset, migration with sealed
// state), "guest" is commands only; "hcrtm" and "locality4" must be granted
// by name. A client that is not listed may use nothing.
type ACL struct {
	Clients map[string]ACLEntry `json:"clients"`
}

// ACLEntry is one client's grant.
type ACLEntry struct {
	Instances    []string `json:"instances"`
	Capabilities []string `json:"capabilities"`

	caps tpmrpc.Capabilities
}

// UnmarshalJSON refuses the old list-only form, which named instances but
// not what the client may do with them.
func (e *ACLEntry) UnmarshalJSON(b []byte) error {
	if t := bytes.TrimSpace(b); len(t) > 0 && t[0] == '[' {
		return fmt.Errorf(`an entry names instances and capabilities, e.g. {"instances": %s, "capabilities": ["host"]} (roles: host, guest)`, t)
	}
	type plain ACLEntry
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode((*plain)(e)); err != nil {
		return err
	}
	if len(e.Instances) == 0 {
		return fmt.Errorf("an entry with no instances")
	}
	if len(e.Capabilities) == 0 {
		return fmt.Errorf(`an entry with no capabilities (e.g. "capabilities": ["guest"])`)
	}
	caps, err := tpmrpc.ParseCapabilities(e.Capabilities)
	if err != nil {
		return err
	}
	e.caps = caps
	return nil
}

// LoadACL reads an ACL file; unknown fields are refused, and an error
// names the client whose entry is wrong.
func LoadACL(path string) (*ACL, error) {
	var raw struct {
		Clients map[string]json.RawMessage `json:"clients"`
	}
	if err := csv.DecodePolicyFile(path, &raw); err != nil {
		return nil, fmt.Errorf("access list: %w", err)
	}
	a := &ACL{Clients: map[string]ACLEntry{}}
	for name, b := range raw.Clients {
		var e ACLEntry
		if err := json.Unmarshal(b, &e); err != nil {
			return nil, fmt.Errorf("access list %s: client %q: %w", path, name, err)
		}
		a.Clients[name] = e
	}
	return a, nil
}

// Authorize implements attestedlink.Authorizer.
func (a *ACL) Authorize(_ context.Context, client *x509.Certificate, instance string) (tpmrpc.Capabilities, error) {
	e, ok := a.Clients[client.Subject.CommonName]
	if !ok {
		return 0, fmt.Errorf("client %q is not in the access list", client.Subject.CommonName)
	}
	if slices.Contains(e.Instances, "*") || slices.Contains(e.Instances, instance) {
		return e.caps, nil
	}
	return 0, fmt.Errorf("client %q is not allowed instance %q", client.Subject.CommonName, instance)
}

// ACLFile is an access list read from a file that can be read again
// (SIGHUP): a file that does not load is refused and the list in force
// stays. Authorisation is asked on every call, so a reload takes effect
// at once, also for sessions already open.
type ACLFile struct {
	Path string
	cur  atomic.Pointer[ACL]
}

// OpenACLFile loads path.
func OpenACLFile(path string) (*ACLFile, error) {
	f := &ACLFile{Path: path}
	return f, f.Reload()
}

// Reload reads the file again; on error the current list is kept.
func (f *ACLFile) Reload() error {
	a, err := LoadACL(f.Path)
	if err != nil {
		return err
	}
	f.cur.Store(a)
	return nil
}

// Authorize implements the Access's ACL with the list in force.
func (f *ACLFile) Authorize(ctx context.Context, client *x509.Certificate, instance string) (tpmrpc.Capabilities, error) {
	return f.cur.Load().Authorize(ctx, client, instance)
}
