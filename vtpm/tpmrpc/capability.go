package tpmrpc

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
)

// Capabilities are what a caller may do with an instance. The backend
// checks every request against the capabilities its caller was granted
// (Allow), so that the host, which relays QEMU's calls, cannot take or
// replace a tenant's TPM state, and a guest cannot reset its own PCRs.
type Capabilities uint32

// The capabilities. A request needs exactly one of them (see Allow).
const (
	// CapCommand: TPM commands at localities 0-3, cancel, set-locality
	// 0-3, and the read-only queries (running, established bit, info,
	// buffer size limits).
	CapCommand Capabilities = 1 << iota
	// CapReset: init, stop (CMD_SHUTDOWN too), store-volatile,
	// set-buffer-size and reset-established, which is what a VM reset and
	// QEMU's start-up need. Init resets the PCRs: a guest user who could
	// reset them could replay a boot it never had.
	CapReset
	// CapMigrate: get-state and set-state, always sealed under the
	// backend's migration key (the backend never hands out or accepts
	// plaintext state on the link).
	CapMigrate
	// CapHCRTM: hash-start/data/end (the H-CRTM sequence that extends
	// PCR 0 at locality 4).
	CapHCRTM
	// CapLocality4: commands, set-locality and reset-established at
	// locality 4.
	CapLocality4
	// CapLock: lock-host. Granted only to a session that proved, with the
	// workload VM's own CSV evidence, to be the workload an instance is
	// bound to.
	CapLock
	// HostBoot marks the host path of an instance bound with host "boot":
	// once the workload has locked it, only CapReset is left to it until
	// the next reset. It grants nothing by itself.
	HostBoot
	capEnd
)

var capNames = []struct {
	name string
	cap  Capabilities
}{
	{"command", CapCommand}, {"reset", CapReset}, {"migrate", CapMigrate},
	{"hcrtm", CapHCRTM}, {"locality4", CapLocality4}, {"lock-host", CapLock}, {"host-boot", HostBoot},
}

// Roles are named sets of capabilities for ACL entries.
var Roles = map[string]Capabilities{
	// host: the frontend serving QEMU's -tpmdev emulator (start-up, VM
	// reset, live migration with sealed state).
	"host": CapCommand | CapReset | CapMigrate,
	// guest: software inside the workload VM through its own attested
	// session (the guest proxy): commands only.
	"guest": CapCommand,
}

// ParseCapabilities reads capability and role names ("host", "guest",
// "command", "reset", "migrate", "hcrtm", "locality4").
func ParseCapabilities(names []string) (Capabilities, error) {
	var c Capabilities
	for _, n := range names {
		if r, ok := Roles[n]; ok {
			c |= r
			continue
		}
		i := slices.IndexFunc(capNames, func(e struct {
			name string
			cap  Capabilities
		}) bool {
			return e.name == n
		})
		if i < 0 {
			return 0, fmt.Errorf("unknown capability %q (want one of host, guest, command, reset, migrate, hcrtm, locality4)", n)
		}
		if capNames[i].cap&(CapLock|HostBoot) != 0 {
			return 0, fmt.Errorf("capability %q comes from an instance's workload binding, not from the access list", n)
		}
		c |= capNames[i].cap
	}
	return c, nil
}

func (c Capabilities) String() string {
	var names []string
	for _, e := range capNames {
		if c&e.cap != 0 {
			names = append(names, e.name)
		}
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

// Needed returns the capability that request r needs.
func Needed(r Request) Capabilities {
	switch r.Op {
	case OpExecute:
		if r.Locality == 4 && r.Arg&ExecuteAtLocality != 0 {
			return CapLocality4
		}
		return CapCommand
	case OpSetLocality:
		if r.Locality == 4 {
			return CapLocality4
		}
		return CapCommand
	case OpResetEstablished:
		if r.Locality == 4 {
			return CapLocality4
		}
		return CapReset
	case OpRunning, OpEstablished, OpCancel, OpInfo, OpMaxCommandSize:
		return CapCommand
	case OpSetBufferSize:
		if r.Arg == 0 { // a query
			return CapCommand
		}
		return CapReset
	case OpInit, OpStop, OpStoreVolatile:
		return CapReset
	case OpGetState, OpSetState:
		return CapMigrate
	case OpHashStart, OpHashData, OpHashEnd:
		return CapHCRTM
	case OpLockHost:
		return CapLock
	}
	return capEnd // unknown operations need a capability nobody has
}

// Allow returns nil if c permits r, or an error naming the operation and
// the missing capability.
func (c Capabilities) Allow(r Request) error {
	need := Needed(r)
	if c&need != 0 {
		return nil
	}
	what := r.Op.String()
	if r.Op == OpExecute && len(r.Payload) >= 10 {
		what = fmt.Sprintf("TPM command %#x", binary.BigEndian.Uint32(r.Payload[6:10]))
	}
	if need == CapLocality4 {
		what += " at locality 4"
	}
	if need == capEnd {
		return fmt.Errorf("%s is not permitted to anyone", what)
	}
	return fmt.Errorf("%s needs the %q capability (granted: %s)", what, need.String(), c.String())
}
