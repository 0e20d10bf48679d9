package freshreport

import (
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func TestCheckEK(t *testing.T) {
	withUnique := func(p tpm2.TPMTPublic) []byte {
		switch p.Type {
		case tpm2.TPMAlgRSA:
			p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: make([]byte, 256)})
		}
		return tpm2.Marshal(p)
	}
	ak := tpm2.RSAEKTemplate
	ak.ObjectAttributes.Decrypt, ak.ObjectAttributes.SignEncrypt = false, true
	noPolicy := tpm2.ECCEKTemplate
	noPolicy.AuthPolicy = tpm2.TPM2BDigest{}
	software := tpm2.RSAEKTemplate
	software.ObjectAttributes.FixedTPM, software.ObjectAttributes.FixedParent = false, false
	for _, tc := range []struct {
		name   string
		handle uint32
		pub    []byte
		want   string // "" = accepted
	}{
		{"RSA EK at 0x81010001", 0x81010001, withUnique(tpm2.RSAEKTemplate), ""},
		{"ECC EK at 0x81010002", 0x81010002, tpm2.Marshal(tpm2.ECCEKTemplate), ""},
		{"EK at a transient handle", 0x80000001, withUnique(tpm2.RSAEKTemplate), "not a persistent EK handle"},
		{"storage key at an EK handle", 0x81010001, tpm2.Marshal(tpm2.RSASRKTemplate), "not an EK template"},
		{"signing key shaped like an EK", 0x81010001, withUnique(ak), "object attributes"},
		{"ECC key without the endorsement policy", 0x81010002, tpm2.Marshal(noPolicy), "auth policy"},
		{"a loaded software key (not fixedTPM)", 0x81010001, withUnique(software), "object attributes"},
		{"garbage", 0x81010001, []byte{1, 2, 3}, "EK public area"},
	} {
		err := CheckEK(tc.handle, tc.pub)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
}
