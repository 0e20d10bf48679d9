package backend

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"cvtpm/attest/certprofile"
	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/vtpm/tpmrpc"
)

// Binding ties an instance to its workload VM (`backend create --bind
// FILE`):
//
//	{"workload": {...csv.AppraisalPolicy: roots, approved measurements,
//	              policy bits, chips...},
//	 "host": "boot"}
//
// Only a session that proves with the workload VM's own CSV report (bound
// to that session, attestedlink.WorkloadReportData) that it is a workload
// the policy approves reaches the instance's guest path; certificate
// identities alone no longer do. "host" limits the host path (QEMU through
// the frontend): "full" leaves it as the ACL grants, "boot" closes it for
// everything but reset once the workload has locked it (until the next
// reset), "none" closes it. The binding's digest is bound into the
// instance's state key: a host that edits or deletes binding.json makes the
// instance unopenable, not unbound.
type Binding struct {
	Workload csv.AppraisalPolicy `json:"workload"`
	Host     string              `json:"host"`

	digest [32]byte
}

const bindingFile = "binding.json"

// ParseBinding reads and checks a binding (unknown fields refused).
func ParseBinding(b []byte) (*Binding, error) {
	var bd Binding
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&bd); err != nil {
		return nil, fmt.Errorf("workload binding: %w", err)
	}
	switch bd.Host {
	case "full", "boot", "none":
	case "":
		return nil, fmt.Errorf(`workload binding: "host" is required: full, boot or none`)
	default:
		return nil, fmt.Errorf("workload binding: host %q: want full, boot or none", bd.Host)
	}
	if len(bd.Workload.ApprovedMeasurements) == 0 {
		return nil, fmt.Errorf("workload binding: the workload policy approves no measurement")
	}
	if err := bd.Workload.Compile(); err != nil {
		return nil, fmt.Errorf("workload binding: %w", err)
	}
	// The workload's HSK+CEK come with its evidence (the backend looks
	// nothing up by serial), so its chip serial is its own claim.
	if len(bd.Workload.AllowChips) > 0 || len(bd.Workload.DenyChips) > 0 {
		return nil, fmt.Errorf("workload binding: %w", csv.ErrEvidenceCertsWithChipLists)
	}
	bd.digest = sha256.Sum256(b)
	return &bd, nil
}

func (b *Binding) keyLabel() string { return "#b" + hex.EncodeToString(b.digest[:8]) }

// Bindings gives an instance's binding (nil: not bound); the Supervisor
// is one.
type Bindings interface {
	Binding(instance string) *Binding
}

// Access authorises link clients: the ACL by certificate, and for bound
// instances the workload's own evidence and the host policy. It is the
// backend's attestedlink.Authorizer.
type Access struct {
	// ACL decides what each client may do (an *ACL, or an *ACLFile that
	// SIGHUP reloads).
	ACL interface {
		Authorize(ctx context.Context, client *x509.Certificate, instance string) (tpmrpc.Capabilities, error)
	}
	Bindings Bindings
	// Revocation, if set, refuses revoked client certificates (checked on
	// every call against the cached CRL).
	Revocation *ClientRevocation
}

// hostCaps are what make a caller the host path.
const hostCaps = tpmrpc.CapReset | tpmrpc.CapMigrate | tpmrpc.CapHCRTM | tpmrpc.CapLocality4

// Authorize implements attestedlink.Authorizer.
func (a *Access) Authorize(ctx context.Context, peer *attestedlink.Peer, instance string) (tpmrpc.Capabilities, error) {
	if err := certprofile.CheckLinkClient(peer.Certificate); err != nil {
		return 0, err
	}
	if a.Revocation != nil {
		if err := a.Revocation.Check(ctx, peer.Certificate); err != nil {
			return 0, err
		}
	}
	caps, err := a.ACL.Authorize(ctx, peer.Certificate, instance)
	if err != nil {
		return 0, err
	}
	b := a.Bindings.Binding(instance)
	if b == nil {
		return caps, nil
	}
	if caps&hostCaps != 0 {
		switch b.Host {
		case "none":
			return 0, fmt.Errorf("instance %s is bound to its workload VM with host access none: the host path is closed", instance)
		case "boot":
			return caps | tpmrpc.HostBoot, nil
		}
		return caps, nil
	}
	if peer.Workload == nil {
		return 0, fmt.Errorf("instance %s is bound to its workload VM: the session must prove it is that workload with its own CSV report (guest proxy --workload-evidence)", instance)
	}
	memo := "workload " + hex.EncodeToString(b.digest[:])
	err, seen := peer.Checked[memo]
	if !seen {
		err = b.checkWorkload(ctx, peer.Workload)
		if peer.Checked != nil {
			peer.Checked[memo] = err
		}
	}
	if err != nil {
		return 0, fmt.Errorf("instance %s: the workload's evidence is refused: %w", instance, err)
	}
	return caps | tpmrpc.CapLock, nil
}

// checkWorkload verifies a session's workload evidence against the binding.
func (b *Binding) checkWorkload(ctx context.Context, w *attestedlink.WorkloadEvidence) error {
	hsk, cek, err := csv.ParseHSKCEK(w.HSKCEK)
	if err != nil {
		return fmt.Errorf("the workload's HSK/CEK: %w", err)
	}
	v := csv.NewVerifier(csv.VerifierOptions{TrustedRoots: b.Workload.TrustedRoots(), Certs: csv.StaticSource{HSK: hsk, CEK: cek}})
	_, err = b.Workload.VerifyAndAppraise(ctx, v, w.Report, w.ReportData[:])
	return err
}
