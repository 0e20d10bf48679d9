package statestore

import (
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
)

// On-disk layout of one state file (all integers big-endian):
//
//	offset size field
//	0      8    magic "CVTPMST\x00"
//	8      2    format version (1)
//	10     2    cipher: 0 none, 1 AES-256-GCM, 2 SM4-GCM
//	12     2    blob name id: 0 manifest, 1 permall, 2 volatilestate, 3 savestate
//	14     2    reserved, zero
//	16     8    generation counter
//	24     4    payload length (bytes after the header)
//	28     12   AEAD nonce (zero when not encrypted)
//	40     8    key id: first 8 bytes of HMAC-SHA256(master key, "cvtpm key id"),
//	            zero when not encrypted; tells "wrong key" from "tampered"
//	48     ...  payload: AEAD ciphertext||tag (header as associated data), or
//	            plaintext||SHA-256(header||plaintext) when not encrypted
const (
	headerLen     = 48
	formatVersion = 1
	checksumLen   = sha256.Size
)

var magic = [8]byte{'C', 'V', 'T', 'P', 'M', 'S', 'T', 0}

// Errors a caller may test for with errors.Is. Every returned error also
// names the file and the check that failed.
var (
	ErrTruncated  = errors.New("truncated")
	ErrCorrupt    = errors.New("corrupt or tampered")
	ErrWrongKey   = errors.New("sealed with a different key")
	ErrNotSealed  = errors.New("not sealed, but a key was given")
	ErrNeedKey    = errors.New("sealed, but no key was given")
	ErrSwapped    = errors.New("holds another blob")
	ErrRolledBack = errors.New("rolled back")
	ErrFormat     = errors.New("unsupported format")
)

// blobIDs maps libtpms' blob names to the ids stored in headers; binding the
// id into the authenticated header detects files swapped between names.
var blobIDs = map[string]uint16{
	manifestName:    0,
	"permall":       1,
	"volatilestate": 2,
	"savestate":     3,
}

// storeBlobID says whether id names one of a store's files (blobIDs).
func storeBlobID(id uint16) bool {
	for _, v := range blobIDs {
		if v == id {
			return true
		}
	}
	return false
}

type header struct {
	cipher     cipherID
	blobID     uint16
	generation uint64
	payloadLen uint32
	nonce      [12]byte
	keyID      [8]byte
}

// appendTo appends the header to dst.
func (h *header) appendTo(dst []byte) []byte {
	dst = slices.Grow(dst, headerLen)
	b := dst[len(dst) : len(dst)+headerLen]
	clear(b)
	copy(b, magic[:])
	binary.BigEndian.PutUint16(b[8:], formatVersion)
	binary.BigEndian.PutUint16(b[10:], uint16(h.cipher))
	binary.BigEndian.PutUint16(b[12:], h.blobID)
	binary.BigEndian.PutUint64(b[16:], h.generation)
	binary.BigEndian.PutUint32(b[24:], h.payloadLen)
	copy(b[28:40], h.nonce[:])
	copy(b[40:48], h.keyID[:])
	return dst[:len(dst)+headerLen]
}

func parseHeader(b []byte) (header, error) {
	var h header
	if len(b) < headerLen {
		return h, fmt.Errorf("%w: %d bytes, a header alone is %d", ErrTruncated, len(b), headerLen)
	}
	if [8]byte(b[:8]) != magic {
		return h, fmt.Errorf("%w: not a cvtpm state file (bad magic)", ErrFormat)
	}
	if v := binary.BigEndian.Uint16(b[8:]); v != formatVersion {
		return h, fmt.Errorf("%w: format version %d, this build reads %d", ErrFormat, v, formatVersion)
	}
	h.cipher = cipherID(binary.BigEndian.Uint16(b[10:]))
	if _, ok := cipherNames[h.cipher]; !ok {
		return h, fmt.Errorf("%w: unknown cipher id %d", ErrFormat, h.cipher)
	}
	h.blobID = binary.BigEndian.Uint16(b[12:])
	if binary.BigEndian.Uint16(b[14:]) != 0 {
		return h, fmt.Errorf("%w: reserved header field is not zero", ErrCorrupt)
	}
	h.generation = binary.BigEndian.Uint64(b[16:])
	h.payloadLen = binary.BigEndian.Uint32(b[24:])
	copy(h.nonce[:], b[28:40])
	copy(h.keyID[:], b[40:48])
	if got := len(b) - headerLen; uint64(got) != uint64(h.payloadLen) {
		if got < int(h.payloadLen) {
			return h, fmt.Errorf("%w: header says %d payload bytes, file has %d", ErrTruncated, h.payloadLen, got)
		}
		return h, fmt.Errorf("%w: header says %d payload bytes, file has %d", ErrCorrupt, h.payloadLen, got)
	}
	return h, nil
}

// gcmOverhead is the AEADs' tag length (AES-GCM and SM4-GCM alike).
const gcmOverhead = 16

// seal frames plain as a state file for blob id with generation gen.
func seal(k *Key, blobID uint16, gen uint64, plain []byte) ([]byte, error) {
	return sealTo(nil, k, blobID, gen, plain)
}

// sealTo is seal appending the file to dst[:0], so that a store can reuse
// one buffer for every file it writes.
func sealTo(dst []byte, k *Key, blobID uint16, gen uint64, plain []byte) ([]byte, error) {
	// Grown as append grows, not to the exact size: the TPM's state grows
	// by a few bytes with each NV index or object it keeps, and an exact
	// fit would make every such write allocate the whole file again.
	dst = slices.Grow(dst[:0], headerLen+len(plain)+max(checksumLen, gcmOverhead))
	h := header{blobID: blobID, generation: gen}
	if k == nil {
		h.payloadLen = uint32(len(plain) + checksumLen)
		out := append(h.appendTo(dst[:0]), plain...)
		sum := sha256.Sum256(out)
		return append(out, sum[:]...), nil
	}
	aead, err := k.aeadFor(blobID)
	if err != nil {
		return nil, err
	}
	h.cipher = k.cipher
	h.keyID = k.id
	if _, err := rand.Read(h.nonce[:]); err != nil {
		return nil, fmt.Errorf("drawing a nonce: %w", err)
	}
	h.payloadLen = uint32(len(plain) + aead.Overhead())
	hdr := h.appendTo(dst[:0])
	return aead.Seal(hdr, h.nonce[:], plain, hdr), nil
}

// open checks and unframes a state file expected to hold blob id wantID.
// It returns the plaintext and the header's generation.
func open(k *Key, wantID uint16, b []byte) ([]byte, uint64, error) {
	h, err := parseHeader(b)
	if err != nil {
		return nil, 0, err
	}
	hdr, payload := b[:headerLen], b[headerLen:]
	switch {
	case h.cipher == cipherNone && k != nil:
		return nil, 0, ErrNotSealed
	case h.cipher != cipherNone && k == nil:
		return nil, 0, fmt.Errorf("%w (%s)", ErrNeedKey, cipherNames[h.cipher])
	case k != nil && h.cipher != k.cipher:
		return nil, 0, fmt.Errorf("%w: file uses %s, the key is for %s", ErrWrongKey, cipherNames[h.cipher], cipherNames[k.cipher])
	case k != nil && subtle.ConstantTimeCompare(h.keyID[:], k.id[:]) != 1:
		return nil, 0, ErrWrongKey
	}
	var plain []byte
	if k == nil {
		if len(payload) < checksumLen {
			return nil, 0, fmt.Errorf("%w: payload shorter than its checksum", ErrTruncated)
		}
		n := len(payload) - checksumLen
		sum := sha256.Sum256(b[:headerLen+n])
		if subtle.ConstantTimeCompare(sum[:], payload[n:]) != 1 {
			return nil, 0, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
		}
		plain = payload[:n]
	} else {
		var aead cipher.AEAD
		if aead, err = k.aeadFor(h.blobID); err != nil {
			return nil, 0, err
		}
		if plain, err = aead.Open(nil, h.nonce[:], payload, hdr); err != nil {
			return nil, 0, fmt.Errorf("%w: authentication failed", ErrCorrupt)
		}
	}
	// Checked after authentication so that a forged id is reported as
	// tampering, an authentic but misplaced file as swapped.
	if h.blobID != wantID {
		return nil, 0, fmt.Errorf("%w (blob id %d, expected %d)", ErrSwapped, h.blobID, wantID)
	}
	return plain, h.generation, nil
}
