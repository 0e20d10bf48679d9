package enroll

import (
	"bytes"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// CheckEKTemplate returns an error unless public (a TPMT_PUBLIC) follows a
// TCG EK template (RSA 2048 or ECC P-256): fixedTPM, fixedParent,
// restricted decrypt, adminWithPolicy, the endorsement policy and the
// template's parameters; only the public key itself may differ. A key a
// caller made or loaded in software does not pass, so the CA certifies and
// the backend reports only keys that cannot leave their TPM.
func CheckEKTemplate(public []byte) error {
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
