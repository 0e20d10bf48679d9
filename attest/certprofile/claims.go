package certprofile

import (
	"encoding/asn1"
	"errors"
	"fmt"
)

// cvtpm's own certificate extensions. Both are PROVISIONAL: they sit under
// 2.999, the arc X.660 reserves for examples, until the project registers
// an IANA private enterprise number.
var (
	// OIDCVTPMCSVClaims: the EK certificate's CSV claims (CSVClaims).
	OIDCVTPMCSVClaims = asn1.ObjectIdentifier{2, 999, 7, 1}
	// OIDCVTPMCertifiedEK: in an AK certificate, SHA-256 of the EK
	// certificate whose credential activation certified the AK (an OCTET
	// STRING).
	OIDCVTPMCertifiedEK = asn1.ObjectIdentifier{2, 999, 7, 2}
)

// CSVClaims are the appraised CSV facts the CA binds into the EK
// certificate (non-critical extension OIDCVTPMCSVClaims), so a relying
// party sees which TEE evidence stood behind the issuance.
type CSVClaims struct {
	Measurement     []byte // the CVM's launch measurement
	Policy          uint32 // CSV guest policy bits
	ChipIDDigest    []byte // SM3 of the chip serial
	RootFingerprint string // SM3 fingerprint of the HYGON root the evidence chained to
	ReportDigest    []byte // digest of the appraised report
	Simulated       bool   // the root was not HYGON's real root
}

// csvClaimsASN1 is the extension's DER form:
//
//	CVTPMCSVClaims ::= SEQUENCE {
//	    measurement     OCTET STRING,
//	    policy          INTEGER,
//	    chipIDDigest    OCTET STRING,
//	    rootFingerprint UTF8String,
//	    reportDigest    OCTET STRING,
//	    simulated       BOOLEAN }
type csvClaimsASN1 struct {
	Measurement     []byte
	Policy          int64
	ChipIDDigest    []byte
	RootFingerprint string `asn1:"utf8"`
	ReportDigest    []byte
	Simulated       bool
}

// MarshalCSVClaims encodes claims as the extension value.
func MarshalCSVClaims(c CSVClaims) ([]byte, error) {
	return asn1.Marshal(csvClaimsASN1{c.Measurement, int64(c.Policy), c.ChipIDDigest, c.RootFingerprint, c.ReportDigest, c.Simulated})
}

// ParseCSVClaims decodes the extension value.
func ParseCSVClaims(der []byte) (CSVClaims, error) {
	var v csvClaimsASN1
	rest, err := asn1.Unmarshal(der, &v)
	if err != nil {
		return CSVClaims{}, fmt.Errorf("CSV claims extension: %w", err)
	}
	if len(rest) != 0 || v.Policy < 0 || v.Policy > 0xffffffff {
		return CSVClaims{}, errors.New("CSV claims extension: malformed")
	}
	return CSVClaims{v.Measurement, uint32(v.Policy), v.ChipIDDigest, v.RootFingerprint, v.ReportDigest, v.Simulated}, nil
}
