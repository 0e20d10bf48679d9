// Package ear is the EAR (EAT Attestation Result, draft-fv-rats-ear) token
// that cvtpm's verifier issues: the claims set, ES256 signing, and
// parsing for relying parties. It is small on purpose: guests and relying
// parties read tokens without linking the verifier's policy engine.
// github.com/veraison/ear is not obtainable from this project's module
// proxy, so the claims follow the draft here.
package ear

import (
	"crypto"
	"encoding/json"
	"fmt"

	"github.com/go-jose/go-jose/v4"
)

// Profile is the eat_profile of EAR tokens.
const Profile = "tag:github.com,2023:veraison/ear"

// Status values (trust tiers) of a submodule.
const (
	StatusAffirming       = "affirming"
	StatusWarning         = "warning"
	StatusContraindicated = "contraindicated"
)

// EAR is the claims set of a result token.
type EAR struct {
	Profile    string            `json:"eat_profile"`
	IssuedAt   int64             `json:"iat"`
	VerifierID map[string]string `json:"ear.verifier-id"`
	Nonce      string            `json:"eat_nonce"`
	Submods    map[string]Submod `json:"submods"`
}

// Submod is one submodule of the result.
type Submod struct {
	Status   string   `json:"ear.status"`
	PolicyID string   `json:"ear.appraisal-policy-id"`
	Reasons  []string `json:"cvtpm.reasons,omitempty"`
	// Evidence is what the verifier established, for relying parties that
	// want the key claims (measurement, chip, EK serial).
	Evidence map[string]any `json:"ear.veraison.annotated-evidence,omitempty"`
}

// Passes reports whether every submodule is affirming or warning.
func (e *EAR) Passes() bool {
	for _, s := range e.Submods {
		if s.Status != StatusAffirming && s.Status != StatusWarning {
			return false
		}
	}
	return len(e.Submods) > 0
}

// Sign serialises e as a compact JWS signed with an ECDSA P-256 key (ES256).
func Sign(e *EAR, key crypto.Signer) (string, error) {
	payload, err := json.Marshal(e)
	if err != nil {
		return "", err
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		return "", fmt.Errorf("EAR signer: %w", err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		return "", fmt.Errorf("signing the EAR: %w", err)
	}
	return jws.CompactSerialize()
}

// Parse checks a token's signature with the verifier's public key and
// returns its claims.
func Parse(token string, pub crypto.PublicKey) (*EAR, error) {
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("EAR token: %w", err)
	}
	payload, err := jws.Verify(pub)
	if err != nil {
		return nil, fmt.Errorf("EAR token signature: %w", err)
	}
	return decode(payload)
}

// ReadUnverified returns a token's claims without checking its signature:
// for display only, never for decisions.
func ReadUnverified(token string) (*EAR, error) {
	jws, err := jose.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("EAR token: %w", err)
	}
	return decode(jws.UnsafePayloadWithoutVerification())
}

func decode(payload []byte) (*EAR, error) {
	var e EAR
	if err := json.Unmarshal(payload, &e); err != nil {
		return nil, fmt.Errorf("EAR token claims: %w", err)
	}
	if e.Profile != Profile {
		return nil, fmt.Errorf("EAR token profile %q, want %q", e.Profile, Profile)
	}
	return &e, nil
}
