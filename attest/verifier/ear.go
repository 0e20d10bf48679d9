package verifier

import (
	"crypto/ecdsa"
	"encoding/base64"
	"errors"

	attestpb "cvtpm/api/attest"
	"cvtpm/attest/ear"
)

// EAR status values, as the policy and the token use them.
const (
	StatusAffirming       = ear.StatusAffirming
	StatusWarning         = ear.StatusWarning
	StatusContraindicated = ear.StatusContraindicated
)

func (v *Verifier) sign(nonce []byte, submods map[string]Submod, f *Facts, ev *attestpb.Evidence) (string, error) {
	if _, ok := v.opts.Signer.Public().(*ecdsa.PublicKey); !ok {
		return "", errors.New("EAR signer: want an ECDSA P-256 key")
	}
	claims := &ear.EAR{
		Profile: ear.Profile, IssuedAt: v.opts.Now().Unix(),
		VerifierID:     map[string]string{"developer": "cvtpm", "build": "cvtpm verifier"},
		Nonce:          base64.RawURLEncoding.EncodeToString(nonce),
		EvidenceDigest: ear.EvidenceDigest(ev),
		Submods:        map[string]ear.Submod{},
	}
	for name, s := range submods {
		sm := ear.Submod{Status: s.Status, PolicyID: "cvtpm/default-v1", Reasons: s.Reasons}
		switch name {
		case "cvtpm-vtpm":
			sm.Evidence = map[string]any{"ek_serial": f.TPM.EKSerial, "pcrs_sha256": f.TPM.PCRs}
		case "csv-platform":
			sm.Evidence = map[string]any{"measurement": f.CSV.Measurement, "chip_serial": f.CSV.ChipSerial,
				"simulated": f.CSV.Simulated, "instance": f.CSV.Instance}
		case "csv-workload":
			sm.Evidence = map[string]any{"present": f.Workload.Present, "measurement": f.Workload.Measurement,
				"chip_serial": f.Workload.ChipSerial, "simulated": f.Workload.Simulated, "policy": f.Workload.Policy}
		}
		claims.Submods[name] = sm
	}
	return ear.Sign(claims, v.opts.Signer)
}
