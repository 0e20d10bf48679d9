package freshreport

import "encoding/binary"

// Clients that enumerate a TPM's commands must find the vendor command
// among them: the Linux kernel's resource manager (/dev/tpmrmN) reads
// TPM_PT_TOTAL_COMMANDS and TPM_CAP_COMMANDS when the TPM is probed and
// refuses any command code not listed (TPM_RC_COMMAND_CODE from the
// kernel, 0xb0143 as the guest sees it). libtpms knows nothing of the
// command, so whoever serves it amends libtpms' answers with
// AmendCapability.

// CommandAttributes is the command's TPMA_CC: commandIndex 0x0101, no
// handles in the handle area (the EK handle is a parameter), V (vendor)
// set.
const CommandAttributes = CommandCode

const (
	ccGetCapability      = 0x0000017a
	capCommands          = 0x00000002
	capTPMProperties     = 0x00000006
	ptTotalCommands      = 0x00000129
	ptVendorCommands     = 0x0000012b
	headerSize           = 10
	getCapabilityCmdSize = headerSize + 12
)

// IsGetCapability reports whether cmd is a TPM2_GetCapability command.
func IsGetCapability(cmd []byte) bool {
	return len(cmd) >= getCapabilityCmdSize && binary.BigEndian.Uint32(cmd[6:10]) == ccGetCapability
}

// AmendCapability returns resp, libtpms' answer to the TPM2_GetCapability
// command cmd, with the vendor command added: its TPMA_CC at the end of a
// TPM_CAP_COMMANDS list that covers it (the last page, when the request's
// first command code is not past it and there is room), and one more in
// TPM_PT_TOTAL_COMMANDS and TPM_PT_VENDOR_COMMANDS. Anything else, or anything it cannot parse, comes
// back unchanged.
func AmendCapability(cmd, resp []byte) []byte {
	if !IsGetCapability(cmd) || len(resp) < headerSize+1+8 || binary.BigEndian.Uint32(resp[6:10]) != 0 {
		return resp
	}
	capability := binary.BigEndian.Uint32(cmd[10:14])
	property := binary.BigEndian.Uint32(cmd[14:18])
	count := binary.BigEndian.Uint32(cmd[18:22])
	moreData := resp[headerSize]
	if binary.BigEndian.Uint32(resp[headerSize+1:]) != capability {
		return resp
	}
	listAt := headerSize + 1 + 4
	n := binary.BigEndian.Uint32(resp[listAt:])
	switch capability {
	case capCommands:
		if moreData != 0 || property > CommandCode || n >= count || len(resp) != listAt+4+4*int(n) {
			return resp
		}
		out := append([]byte(nil), resp...)
		out = binary.BigEndian.AppendUint32(out, CommandAttributes)
		binary.BigEndian.PutUint32(out[listAt:], n+1)
		binary.BigEndian.PutUint32(out[2:6], uint32(len(out)))
		return out
	case capTPMProperties:
		if len(resp) != listAt+4+8*int(n) {
			return resp
		}
		out := append([]byte(nil), resp...)
		for i := range int(n) {
			at := listAt + 4 + 8*i
			if p := binary.BigEndian.Uint32(out[at:]); p == ptTotalCommands || p == ptVendorCommands {
				binary.BigEndian.PutUint32(out[at+4:], binary.BigEndian.Uint32(out[at+4:])+1)
			}
		}
		return out
	}
	return resp
}
