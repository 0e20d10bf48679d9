// Package ear is the EAR (EAT Attestation Result, draft-fv-rats-ear) token
// that cvtpm's verifier issues: the claims set, ES256 signing, and
// parsing for relying parties. It is small on purpose: guests and relying
// parties read tokens without linking the verifier's policy engine.
// github.com/veraison/ear is not obtainable from this project's module
// proxy, so the claims follow the draft here.
package ear

import (
	"crypto"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/go-jose/go-jose/v4"

	attestpb "cvtpm/api/attest"
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
	// EvidenceDigest is EvidenceDigest of the evidence this verdict
	// judged: the attester checks it is the evidence it sent, not other
	// evidence a relay sent for the same nonce.
	EvidenceDigest string            `json:"cvtpm.evidence-sha256,omitempty"`
	Submods        map[string]Submod `json:"submods"`
}

// EvidenceDigest is the hex SHA-256 over every field of ev, in field
// order, each u32-length-prefixed (repeated fields: a count, then each):
// one definition for the verifier that signs it and the attester that
// compares it, independent of protobuf's encoding.
func EvidenceDigest(ev *attestpb.Evidence) string {
	h := sha256.New()
	field := func(b []byte) {
		h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(b))))
		h.Write(b)
	}
	h.Write([]byte("cvtpm evidence v1"))
	field(ev.GetTpmAttestation())
	h.Write(binary.BigEndian.AppendUint32(nil, uint32(len(ev.GetEkChain()))))
	for _, c := range ev.GetEkChain() {
		field(c)
	}
	for _, b := range [][]byte{[]byte(ev.GetInstanceId()), ev.GetEkPublic(), ev.GetCsvReport(), ev.GetCsvHskCek(),
		ev.GetWorkloadReport(), ev.GetWorkloadHskCek()} {
		field(b)
	}
	return hex.EncodeToString(h.Sum(nil))
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
