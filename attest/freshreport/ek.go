package freshreport

import (
	"bytes"
	"fmt"

	"github.com/google/go-tpm/tpm2"
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
	pub, err := tpm2.Unmarshal[tpm2.TPMTPublic](public)
	if err != nil {
		return fmt.Errorf("EK public area: %w", err)
	}
	var tmpl tpm2.TPMTPublic
	switch pub.Type {
	case tpm2.TPMAlgRSA:
		tmpl = tpm2.RSAEKTemplate
	case tpm2.TPMAlgECC:
		tmpl = tpm2.ECCEKTemplate
	default:
		return fmt.Errorf("key type %#x is not an EK type", pub.Type)
	}
	switch {
	case pub.NameAlg != tmpl.NameAlg:
		return fmt.Errorf("name algorithm %#x, an EK template has %#x", pub.NameAlg, tmpl.NameAlg)
	case pub.ObjectAttributes != tmpl.ObjectAttributes:
		return fmt.Errorf("object attributes %+v are not an EK template's (fixedTPM, fixedParent, restricted decrypt, adminWithPolicy)", pub.ObjectAttributes)
	case !bytes.Equal(pub.AuthPolicy.Buffer, tmpl.AuthPolicy.Buffer):
		return fmt.Errorf("auth policy %x is not the endorsement policy", pub.AuthPolicy.Buffer)
	}
	// Everything but the public key itself (the symmetric scheme, key size
	// or curve too) must be the template's.
	same := *pub
	same.Unique = tmpl.Unique
	if !bytes.Equal(tpm2.Marshal(same), tpm2.Marshal(tmpl)) {
		return fmt.Errorf("key parameters are not an EK template's")
	}
	return nil
}
