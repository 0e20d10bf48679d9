// Package csv verifies and produces HYGON CSV attestation evidence: the
// binary certificates and reports of HYGON's secure processor, the chain
// HRK -> HSK -> CEK -> PEK -> report, the guest device that asks the firmware
// for a report, and a software simulator of that firmware for machines
// without HYGON CPUs.
//
// CSV concepts in brief: the HYGON Root Key (HRK) is HYGON's self-signed
// root. It signs the HYGON Signing Key (HSK), which signs each chip's Chip
// Endorsement Key (CEK). The CEK signs the Platform Endorsement Key (PEK) that
// the firmware generates and that signs attestation reports. A report carries
// the launch measurement of the guest, its policy, its VM id and 64 bytes of
// report_data chosen by the guest, so a verifier can bind a fresh nonce or a
// key to "this code runs in a CSV VM on a genuine HYGON chip".
//
// All structures are little-endian and fixed-size; Parse and Marshal
// round-trip byte for byte.
package csv

import (
	"crypto/ecdsa"
	"crypto/rand"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"

	"github.com/emmansun/gmsm/sm2"
)

// Usage codes name the role of a key in HYGON certificates.
const (
	UsageHRK uint32 = 0x0000
	UsageHSK uint32 = 0x0013
	UsageOCA uint32 = 0x1001
	UsagePEK uint32 = 0x1002
	UsagePDH uint32 = 0x1003
	UsageCEK uint32 = 0x1004
)

// Algorithm codes of HYGON certificates and reports.
const (
	AlgoNone  uint32 = 0
	AlgoSM2SA uint32 = 4 // SM2 signature with SM3
	AlgoSM2DH uint32 = 5 // SM2 key agreement
)

// CurveSM2 is the only curve id HYGON uses (SM2 256-bit).
const CurveSM2 uint32 = 3

// Sizes of the binary structures.
const (
	CACertSize   = 832
	CSVCertSize  = 2084
	HSKCEKSize   = CACertSize + CSVCertSize
	ReportV1Size = 2548 // bytes the firmware fills in a v1 report
	ReportPage   = 4096 // the buffer the guest driver returns
	WrapperSize  = 16 + 4 + ReportPage
	pubKeySize   = 4 + 72 + 72
	sigSize      = 72 + 72
)

// ExtMagic marks csv-rs's extended report wrapper (magic || flags || page),
// the only serialised form that says whether the page holds a v1 or v2 report.
var ExtMagic = [16]byte{'A', 'T', 'T', 'E', 'S', 'T', 'A', 'T', 'I', 'O', 'N', '_', 'E', 'X', 'T', 0}

// PubKey is an SM2 public key as HYGON stores it: a curve id and the affine
// coordinates little-endian in 72-byte fields of which the first 32 are used.
type PubKey struct {
	Curve uint32
	X, Y  [72]byte
}

// ECDSA converts the key for gmsm, rejecting unknown curves, non-zero padding
// and points off the curve.
func (k *PubKey) ECDSA() (*ecdsa.PublicKey, error) {
	if k.Curve != CurveSM2 {
		return nil, fmt.Errorf("public key curve %d, want %d (SM2)", k.Curve, CurveSM2)
	}
	if !zero(k.X[32:]) || !zero(k.Y[32:]) {
		return nil, errors.New("public key coordinate padding is not zero")
	}
	pt := make([]byte, 65)
	pt[0] = 4
	copy(pt[1:33], reversed(k.X[:32]))
	copy(pt[33:], reversed(k.Y[:32]))
	pub, err := sm2.NewPublicKey(pt)
	if err != nil {
		return nil, fmt.Errorf("public key not on SM2 curve: %w", err)
	}
	return pub, nil
}

// PubKeyFromECDSA stores an SM2 public key in HYGON's layout.
func PubKeyFromECDSA(pub *ecdsa.PublicKey) PubKey {
	k := PubKey{Curve: CurveSM2}
	var b [32]byte
	pub.X.FillBytes(b[:])
	copy(k.X[:32], reversed(b[:]))
	pub.Y.FillBytes(b[:])
	copy(k.Y[:32], reversed(b[:]))
	return k
}

func (k *PubKey) put(b []byte) {
	binary.LittleEndian.PutUint32(b, k.Curve)
	copy(b[4:76], k.X[:])
	copy(b[76:148], k.Y[:])
}

func (k *PubKey) get(b []byte) {
	k.Curve = binary.LittleEndian.Uint32(b)
	copy(k.X[:], b[4:76])
	copy(k.Y[:], b[76:148])
}

// Signature is an SM2 signature as HYGON stores it: r and s little-endian in
// 72-byte fields of which the first 32 are used.
type Signature struct {
	R, S [72]byte
}

func (s *Signature) put(b []byte) { copy(b[:72], s.R[:]); copy(b[72:144], s.S[:]) }
func (s *Signature) get(b []byte) { copy(s.R[:], b[:72]); copy(s.S[:], b[72:144]) }

// verifySM2 checks sig over msg by pub with the signer's user id (the Z value
// of GB/T 32918 is computed from uid and the key).
func verifySM2(pub *PubKey, uid, msg []byte, sig *Signature) error {
	key, err := pub.ECDSA()
	if err != nil {
		return err
	}
	if !zero(sig.R[32:]) || !zero(sig.S[32:]) {
		return errors.New("signature padding is not zero")
	}
	r := new(big.Int).SetBytes(reversed(sig.R[:32]))
	s := new(big.Int).SetBytes(reversed(sig.S[:32]))
	der, err := asn1.Marshal(struct{ R, S *big.Int }{r, s})
	if err != nil {
		return fmt.Errorf("encode signature: %w", err)
	}
	if !sm2.VerifyASN1WithSM2(key, uid, msg, der) {
		return errors.New("SM2 signature does not verify")
	}
	return nil
}

// signSM2 produces a HYGON-layout signature (used by the simulator).
func signSM2(priv *sm2.PrivateKey, uid, msg []byte) (Signature, error) {
	der, err := priv.SignWithSM2(randReader, uid, msg)
	if err != nil {
		return Signature{}, fmt.Errorf("sm2 sign: %w", err)
	}
	var rs struct{ R, S *big.Int }
	if _, err := asn1.Unmarshal(der, &rs); err != nil {
		return Signature{}, fmt.Errorf("decode own signature: %w", err)
	}
	var sig Signature
	var b [32]byte
	rs.R.FillBytes(b[:])
	copy(sig.R[:32], reversed(b[:]))
	rs.S.FillBytes(b[:])
	copy(sig.S[:32], reversed(b[:]))
	return sig, nil
}

// CACert is HYGON's 832-byte CA certificate, used for the HRK (self-signed)
// and the HSK (signed by the HRK). KeyID names this key; SigKeyID names the
// key that signed it.
type CACert struct {
	Version   uint32
	KeyID     [16]byte
	SigKeyID  [16]byte
	Usage     uint32
	Reserved0 [24]byte
	PubKey    PubKey
	UIDSize   uint16
	UserID    [254]byte
	Reserved1 [108]byte
	Sig       Signature
	Reserved2 [112]byte
}

// caSignedLen is the prefix of a CA certificate covered by its signature.
const caSignedLen = 576

// ParseCACert decodes an 832-byte CA certificate.
func ParseCACert(b []byte) (*CACert, error) {
	if len(b) != CACertSize {
		return nil, fmt.Errorf("CA certificate is %d bytes, want %d", len(b), CACertSize)
	}
	c := &CACert{}
	c.Version = binary.LittleEndian.Uint32(b[0:])
	copy(c.KeyID[:], b[4:20])
	copy(c.SigKeyID[:], b[20:36])
	c.Usage = binary.LittleEndian.Uint32(b[36:])
	copy(c.Reserved0[:], b[40:64])
	c.PubKey.get(b[64:212])
	c.UIDSize = binary.LittleEndian.Uint16(b[212:])
	copy(c.UserID[:], b[214:468])
	copy(c.Reserved1[:], b[468:576])
	c.Sig.get(b[576:720])
	copy(c.Reserved2[:], b[720:832])
	return c, nil
}

// Marshal encodes the certificate in its 832-byte form.
func (c *CACert) Marshal() []byte {
	b := make([]byte, CACertSize)
	binary.LittleEndian.PutUint32(b[0:], c.Version)
	copy(b[4:20], c.KeyID[:])
	copy(b[20:36], c.SigKeyID[:])
	binary.LittleEndian.PutUint32(b[36:], c.Usage)
	copy(b[40:64], c.Reserved0[:])
	c.PubKey.put(b[64:212])
	binary.LittleEndian.PutUint16(b[212:], c.UIDSize)
	copy(b[214:468], c.UserID[:])
	copy(b[468:576], c.Reserved1[:])
	c.Sig.put(b[576:720])
	copy(b[720:832], c.Reserved2[:])
	return b
}

// UID is the signer user id that enters the SM2 Z value of signatures made
// with this certificate's key (for example "HYGON-SSD-HRK").
func (c *CACert) UID() ([]byte, error) { return uid(c.UIDSize, c.UserID[:]) }

func uid(n uint16, field []byte) ([]byte, error) {
	if int(n) > len(field) || n == 0 {
		return nil, fmt.Errorf("user id size %d out of range 1..%d", n, len(field))
	}
	return field[:n], nil
}

// SigSlot is one of the two signature slots of a CSV certificate: the usage
// and algorithm of the signing key and the signature.
type SigSlot struct {
	Usage    uint32
	Algo     uint32
	Sig      Signature
	Reserved [368]byte
}

// empty reports whether the slot holds no signature, by csv-rs's rule: a slot
// is used only if its usage names a key role and its algorithm is SM2.
func (s *SigSlot) empty() bool {
	switch s.Usage {
	case UsageCEK, UsageHRK, UsageHSK, UsageOCA, UsagePDH, UsagePEK:
		return s.Algo != AlgoSM2SA && s.Algo != AlgoSM2DH
	}
	return true
}

// CSVCert is HYGON's 2084-byte platform certificate, used for the CEK (signed
// by the HSK in slot 0) and the PEK (signed by the CEK in slot 0 and by the
// owner's OCA in slot 1).
type CSVCert struct {
	Version       uint32
	FirmwareMajor uint8
	FirmwareMinor uint8
	Reserved1     uint16
	KeyUsage      uint32
	KeyAlgo       uint32
	PubKey        PubKey
	UIDSize       uint16
	UserID        [254]byte
	SID           [16]byte
	Reserved2     [608]byte
	Sigs          [2]SigSlot
}

// csvSignedLen is the prefix of a CSV certificate covered by its signatures.
const csvSignedLen = 1044

// ParseCSVCert decodes a 2084-byte CSV certificate.
func ParseCSVCert(b []byte) (*CSVCert, error) {
	if len(b) != CSVCertSize {
		return nil, fmt.Errorf("CSV certificate is %d bytes, want %d", len(b), CSVCertSize)
	}
	c := &CSVCert{}
	c.Version = binary.LittleEndian.Uint32(b[0:])
	c.FirmwareMajor, c.FirmwareMinor = b[4], b[5]
	c.Reserved1 = binary.LittleEndian.Uint16(b[6:])
	c.KeyUsage = binary.LittleEndian.Uint32(b[8:])
	c.KeyAlgo = binary.LittleEndian.Uint32(b[12:])
	c.PubKey.get(b[16:164])
	c.UIDSize = binary.LittleEndian.Uint16(b[164:])
	copy(c.UserID[:], b[166:420])
	copy(c.SID[:], b[420:436])
	copy(c.Reserved2[:], b[436:1044])
	for i := range c.Sigs {
		s := b[csvSignedLen+520*i:]
		c.Sigs[i].Usage = binary.LittleEndian.Uint32(s[0:])
		c.Sigs[i].Algo = binary.LittleEndian.Uint32(s[4:])
		c.Sigs[i].Sig.get(s[8:152])
		copy(c.Sigs[i].Reserved[:], s[152:520])
	}
	return c, nil
}

// Marshal encodes the certificate in its 2084-byte form.
func (c *CSVCert) Marshal() []byte {
	b := make([]byte, CSVCertSize)
	binary.LittleEndian.PutUint32(b[0:], c.Version)
	b[4], b[5] = c.FirmwareMajor, c.FirmwareMinor
	binary.LittleEndian.PutUint16(b[6:], c.Reserved1)
	binary.LittleEndian.PutUint32(b[8:], c.KeyUsage)
	binary.LittleEndian.PutUint32(b[12:], c.KeyAlgo)
	c.PubKey.put(b[16:164])
	binary.LittleEndian.PutUint16(b[164:], c.UIDSize)
	copy(b[166:420], c.UserID[:])
	copy(b[420:436], c.SID[:])
	copy(b[436:1044], c.Reserved2[:])
	for i := range c.Sigs {
		s := b[csvSignedLen+520*i:]
		binary.LittleEndian.PutUint32(s[0:], c.Sigs[i].Usage)
		binary.LittleEndian.PutUint32(s[4:], c.Sigs[i].Algo)
		c.Sigs[i].Sig.put(s[8:152])
		copy(s[152:520], c.Sigs[i].Reserved[:])
	}
	return b
}

// UID is the signer user id of this certificate's key (for example
// "HYGON-SSD-CEK").
func (c *CSVCert) UID() ([]byte, error) { return uid(c.UIDSize, c.UserID[:]) }

// ParseHSKCEK splits the 2916-byte HSK || CEK bundle that HYGON's KDS serves
// per chip.
func ParseHSKCEK(b []byte) (*CACert, *CSVCert, error) {
	if len(b) != HSKCEKSize {
		return nil, nil, fmt.Errorf("HSK+CEK bundle is %d bytes, want %d", len(b), HSKCEKSize)
	}
	hsk, err := ParseCACert(b[:CACertSize])
	if err != nil {
		return nil, nil, fmt.Errorf("HSK: %w", err)
	}
	cek, err := ParseCSVCert(b[CACertSize:])
	if err != nil {
		return nil, nil, fmt.Errorf("CEK: %w", err)
	}
	return hsk, cek, nil
}

// MarshalHSKCEK encodes the HSK || CEK bundle.
func MarshalHSKCEK(hsk *CACert, cek *CSVCert) []byte {
	return append(hsk.Marshal(), cek.Marshal()...)
}

func zero(b []byte) bool {
	for _, v := range b {
		if v != 0 {
			return false
		}
	}
	return true
}

func reversed(b []byte) []byte {
	r := make([]byte, len(b))
	for i, v := range b {
		r[len(b)-1-i] = v
	}
	return r
}

// randReader is the entropy source for simulator keys and signatures.
var randReader = rand.Reader
