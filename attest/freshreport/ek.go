package freshreport

import (
	"fmt"

	"cvtpm/enroll"
)

// EK handles are the TCG registry's range for endorsement keys
// (0x81010000-0x810100FF: RSA 2048 at 0x81010001, ECC P-256 at 0x81010002).
const (
	ekHandleFirst = 0x81010000
	ekHandleLast  = 0x810100ff
)

// CheckEK reports whether handle and public (a TPMT_PUBLIC) are an EK the
// fresh-report command may answer for: a persistent handle in the TCG EK
// range whose public area follows a TCG EK template (RSA 2048 or ECC P-256:
// fixedTPM, fixedParent, restricted decrypt, the endorsement policy). A
// transient key, or any key a caller loaded (TPM2_LoadExternal of a
// software key), is refused: the report would otherwise vouch for it.
func CheckEK(handle uint32, public []byte) error {
	if handle < ekHandleFirst || handle > ekHandleLast {
		return fmt.Errorf("handle %#x is not a persistent EK handle (0x81010000-0x810100ff)", handle)
	}
	return enroll.CheckEKTemplate(public)
}
