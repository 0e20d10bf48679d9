package csv

import (
	"bytes"
	"crypto/hmac"
	"encoding/binary"
	"fmt"

	"github.com/emmansun/gmsm/sm3"
)

// Byte offsets inside a report page.
const (
	teeV1Len        = 336  // tee_info of a v1 report
	teeV2Len        = 1168 // tee_info of a v2 report
	v1SignedLen     = 180  // v1 signature covers stored bytes 0..180 (through policy)
	v2SignedLen     = 1024 // v2 signature covers stored bytes 0..1024
	v1XORLen        = 188  // v1 bytes 0..188 are XORed with anonce
	signerLen       = CSVCertSize + 64 + 32 + 32
	signerMACCovers = CSVCertSize + 64 + 32
)

// Report is a CSV attestation report with the anonce obfuscation of v1
// removed: every field holds its true value, and Marshal re-applies the XOR so
// that Marshal(ParseReport(b)) == b.
type Report struct {
	// Version is 1 (CSV/CSV2 firmware) or 2 (CSV3, firmware build >= 2337).
	Version int

	// Wrapped reports whether the bytes came in csv-rs's wrapper
	// (magic || flags || 4096-byte page), the only form that can carry v2.
	Wrapped      bool
	WrapperMagic [16]byte
	WrapperFlags uint32
	// PageLen is the length of the report page: 2548 or 4096 for v1,
	// 4096 when wrapped.
	PageLen int

	UserPubKeyDigest [32]byte
	VMID             [16]byte
	VMVersion        [16]byte
	ReportData       [64]byte
	MNonce           [16]byte
	Measure          [32]byte
	Policy           uint32
	SigUsage         uint32
	SigAlgo          uint32
	Anonce           uint32 // v1 only: the XOR mask

	Build       uint32 // v2 only
	RTMRVersion uint16 // v2 only
	Reserved0   [14]byte
	RTMR        [5][32]byte // v2 only
	Reserved1   [656]byte

	Sig Signature

	PEK            *CSVCert
	SN             [64]byte // chip serial number, NUL padded
	SignerReserved [32]byte
	MAC            [32]byte // HMAC-SM3(mnonce, stored pek || sn || reserved)

	// Tail is the rest of the page after the signer, kept verbatim.
	Tail []byte
}

// ParseReport decodes a report: a raw v1 page (2548 or 4096 bytes) or the
// 4116-byte wrapper carrying a v1 or v2 page.
func ParseReport(b []byte) (*Report, error) {
	r := &Report{}
	page := b
	switch len(b) {
	case ReportV1Size, ReportPage:
		r.Version = 1
	case WrapperSize:
		r.Wrapped = true
		copy(r.WrapperMagic[:], b[:16])
		r.WrapperFlags = binary.LittleEndian.Uint32(b[16:])
		page = b[20:]
		switch {
		case r.WrapperMagic == [16]byte{}:
			r.Version = 1
		case r.WrapperMagic == ExtMagic && r.WrapperFlags == 0:
			r.Version = 1
		case r.WrapperMagic == ExtMagic && r.WrapperFlags == 1:
			r.Version = 2
		default:
			return nil, fmt.Errorf("report wrapper: unknown magic %x / flags %d", r.WrapperMagic, r.WrapperFlags)
		}
	default:
		return nil, fmt.Errorf("report is %d bytes, want %d or %d (v1 page) or %d (wrapped)", len(b), ReportV1Size, ReportPage, WrapperSize)
	}
	r.PageLen = len(page)
	p := bytes.Clone(page)
	tee := teeV1Len
	if r.Version == 1 {
		r.Anonce = binary.LittleEndian.Uint32(p[188:])
		xorAnonce(p[:v1XORLen], r.Anonce)
		xorAnonce(p[tee:tee+CSVCertSize+64], r.Anonce)
	} else {
		tee = teeV2Len
	}
	copy(r.UserPubKeyDigest[:], p[0:32])
	copy(r.VMID[:], p[32:48])
	copy(r.VMVersion[:], p[48:64])
	copy(r.ReportData[:], p[64:128])
	copy(r.MNonce[:], p[128:144])
	copy(r.Measure[:], p[144:176])
	r.Policy = binary.LittleEndian.Uint32(p[176:])
	r.SigUsage = binary.LittleEndian.Uint32(p[180:])
	r.SigAlgo = binary.LittleEndian.Uint32(p[184:])
	if r.Version == 1 {
		r.Sig.get(p[192:336])
	} else {
		r.Build = binary.LittleEndian.Uint32(p[188:])
		r.RTMRVersion = binary.LittleEndian.Uint16(p[192:])
		copy(r.Reserved0[:], p[194:208])
		for i := range r.RTMR {
			copy(r.RTMR[i][:], p[208+32*i:])
		}
		copy(r.Reserved1[:], p[368:1024])
		r.Sig.get(p[1024:1168])
	}
	s := p[tee:]
	pek, err := ParseCSVCert(s[:CSVCertSize])
	if err != nil {
		return nil, fmt.Errorf("PEK in report: %w", err)
	}
	r.PEK = pek
	copy(r.SN[:], s[CSVCertSize:])
	copy(r.SignerReserved[:], s[CSVCertSize+64:])
	copy(r.MAC[:], s[CSVCertSize+96:])
	r.Tail = bytes.Clone(s[signerLen:])
	return r, nil
}

func (r *Report) teeLen() int {
	if r.Version == 2 {
		return teeV2Len
	}
	return teeV1Len
}

// page encodes the stored report page (XORed for v1).
func (r *Report) page() []byte {
	n := r.PageLen
	if n == 0 {
		n = ReportV1Size
		if r.Version == 2 || r.Wrapped {
			n = ReportPage
		}
	}
	tee := r.teeLen()
	if n < tee+signerLen {
		n = tee + signerLen
	}
	p := make([]byte, n)
	copy(p[0:32], r.UserPubKeyDigest[:])
	copy(p[32:48], r.VMID[:])
	copy(p[48:64], r.VMVersion[:])
	copy(p[64:128], r.ReportData[:])
	copy(p[128:144], r.MNonce[:])
	copy(p[144:176], r.Measure[:])
	binary.LittleEndian.PutUint32(p[176:], r.Policy)
	binary.LittleEndian.PutUint32(p[180:], r.SigUsage)
	binary.LittleEndian.PutUint32(p[184:], r.SigAlgo)
	if r.Version == 2 {
		binary.LittleEndian.PutUint32(p[188:], r.Build)
		binary.LittleEndian.PutUint16(p[192:], r.RTMRVersion)
		copy(p[194:208], r.Reserved0[:])
		for i := range r.RTMR {
			copy(p[208+32*i:], r.RTMR[i][:])
		}
		copy(p[368:1024], r.Reserved1[:])
		r.Sig.put(p[1024:1168])
	} else {
		binary.LittleEndian.PutUint32(p[188:], r.Anonce)
		r.Sig.put(p[192:336])
	}
	s := p[tee:]
	if r.PEK != nil {
		copy(s, r.PEK.Marshal())
	}
	copy(s[CSVCertSize:], r.SN[:])
	copy(s[CSVCertSize+64:], r.SignerReserved[:])
	copy(s[CSVCertSize+96:], r.MAC[:])
	copy(s[signerLen:], r.Tail)
	if r.Version == 1 {
		xorAnonce(p[:v1XORLen], r.Anonce)
		xorAnonce(s[:CSVCertSize+64], r.Anonce)
	}
	return p
}

// Marshal encodes the report in the form it was parsed from (or, for a new
// report, a 2548-byte v1 page or a wrapped v2 page).
func (r *Report) Marshal() []byte {
	p := r.page()
	if !r.Wrapped && r.Version == 1 {
		return p
	}
	magic, flags := r.WrapperMagic, r.WrapperFlags
	if !r.Wrapped {
		magic, flags = ExtMagic, 1
	}
	b := make([]byte, 20, 20+len(p))
	copy(b, magic[:])
	binary.LittleEndian.PutUint32(b[16:], flags)
	return append(b, p...)
}

// SignedBytes is the stored region the PEK signature covers.
func (r *Report) SignedBytes() []byte {
	if r.Version == 2 {
		return r.page()[:v2SignedLen]
	}
	return r.page()[:v1SignedLen]
}

// ComputeMAC is HMAC-SM3 keyed with the true mnonce over the stored
// pek_cert || sn || reserved, as the firmware computes it.
func (r *Report) ComputeMAC() [32]byte {
	tee := r.teeLen()
	m := hmac.New(sm3.New, r.MNonce[:])
	m.Write(r.page()[tee : tee+signerMACCovers])
	var out [32]byte
	copy(out[:], m.Sum(nil))
	return out
}

// ChipSerial is the chip serial number with NUL padding removed. It is only a
// lookup hint: the firmware does not sign it, so it counts only through the
// CEK that is fetched for it and must then verify.
func (r *Report) ChipSerial() string {
	return string(bytes.TrimRight(r.SN[:], "\x00"))
}

func xorAnonce(b []byte, anonce uint32) {
	var k [4]byte
	binary.LittleEndian.PutUint32(k[:], anonce)
	for i := range b {
		b[i] ^= k[i%4]
	}
}

// Policy is the decoded CSV guest policy word.
type Policy struct {
	Raw        uint32 `json:"raw"`
	NoDebug    bool   `json:"nodbg"`
	NoKeyShare bool   `json:"noks"`
	ES         bool   `json:"es"`
	NoSend     bool   `json:"nosend"`
	Domain     bool   `json:"domain"`
	CSV        bool   `json:"csv"`
	CSV3       bool   `json:"csv3"`
	ASIDReuse  bool   `json:"asid_reuse"`
	HSKVersion uint8  `json:"hsk_version"`
	CEKVersion uint8  `json:"cek_version"`
	APIMajor   uint8  `json:"api_major"`
	APIMinor   uint8  `json:"api_minor"`
}

// DecodePolicy splits the policy word into its bits and fields.
func DecodePolicy(p uint32) Policy {
	bit := func(i uint) bool { return p&(1<<i) != 0 }
	return Policy{
		Raw: p, NoDebug: bit(0), NoKeyShare: bit(1), ES: bit(2), NoSend: bit(3),
		Domain: bit(4), CSV: bit(5), CSV3: bit(6), ASIDReuse: bit(7),
		HSKVersion: uint8(p >> 8 & 0xf), CEKVersion: uint8(p >> 12 & 0xf),
		APIMajor: uint8(p >> 16), APIMinor: uint8(p >> 24),
	}
}
