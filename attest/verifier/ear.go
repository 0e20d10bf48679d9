package verifier

import (
	"crypto"
	"crypto/ecdsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/go-jose/go-jose/v4"
)

// The EAR (EAT Attestation Result, draft-fv-rats-ear) claims cvtpm
// issues. github.com/veraison/ear is not obtainable from this project's
// module proxy, so the claims set is written here following the draft;
// the token is a compact JWS (ES256).
const earProfile = "tag:github.com,2023:veraison/ear"

// EAR is the claims set of a result token.
type EAR struct {
	Profile    string               `json:"eat_profile"`
	IssuedAt   int64                `json:"iat"`
	VerifierID map[string]string    `json:"ear.verifier-id"`
	Nonce      string               `json:"eat_nonce"`
	Submods    map[string]EARSubmod `json:"submods"`
}

// EARSubmod is one submodule of the result.
type EARSubmod struct {
	Status   string   `json:"ear.status"`
	PolicyID string   `json:"ear.appraisal-policy-id"`
	Reasons  []string `json:"cvtpm.reasons,omitempty"`
	// Evidence is what the verifier established, for relying parties that
	// want the key claims (measurement, chip, EK serial).
	Evidence map[string]any `json:"ear.veraison.annotated-evidence,omitempty"`
}

func (v *Verifier) sign(nonce []byte, submods map[string]Submod, f *Facts) (string, error) {
	key, ok := v.opts.Signer.Public().(*ecdsa.PublicKey)
	if !ok {
		return "", errors.New("EAR signer: want an ECDSA P-256 key")
	}
	_ = key
	claims := EAR{
		Profile: earProfile, IssuedAt: v.opts.Now().Unix(),
		VerifierID: map[string]string{"developer": "cvtpm", "build": "cvtpm verifier"},
		Nonce:      base64.RawURLEncoding.EncodeToString(nonce),
		Submods:    map[string]EARSubmod{},
	}
	for name, s := range submods {
		sm := EARSubmod{Status: s.Status, PolicyID: "cvtpm/default-v1", Reasons: s.Reasons}
		switch name {
		case "cvtpm-vtpm":
			sm.Evidence = map[string]any{"ek_serial": f.TPM.EKSerial, "pcrs_sha256": f.TPM.PCRs}
		case "csv-platform":
			sm.Evidence = map[string]any{"measurement": f.CSV.Measurement, "chip_serial": f.CSV.ChipSerial,
				"simulated": f.CSV.Simulated, "instance": f.CSV.Instance}
		}
		claims.Submods[name] = sm
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: v.opts.Signer},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", fmt.Errorf("EAR signer: %w", err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("signing the EAR: %w", err)
	}
	return jws.CompactSerialize()
}

// ParseToken checks a token's signature with the verifier's public key and
// returns its claims.
func ParseToken(token string, pub crypto.PublicKey) (*EAR, error) {
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("EAR token: %w", err)
	}
	payload, err := jws.Verify(pub)
	if err != nil {
		return nil, fmt.Errorf("EAR token signature: %w", err)
	}
	var e EAR
	if err := json.Unmarshal(payload, &e); err != nil {
		return nil, fmt.Errorf("EAR token claims: %w", err)
	}
	if e.Profile != earProfile {
		return nil, fmt.Errorf("EAR token profile %q", e.Profile)
	}
	return &e, nil
}

// ReadTokenUnverified returns a token's claims without checking its
// signature: for display only, never for decisions.
func ReadTokenUnverified(token string) (*EAR, error) {
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("EAR token: %w", err)
	}
	var e EAR
	if err := json.Unmarshal(jws.UnsafePayloadWithoutVerification(), &e); err != nil {
		return nil, fmt.Errorf("EAR token claims: %w", err)
	}
	return &e, nil
}
