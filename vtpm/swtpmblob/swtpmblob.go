// Package swtpmblob is swtpm's state-blob format: what CMD_GET_STATEBLOB
// hands out and CMD_SET_STATEBLOB takes (also the tpm2-00.* files swtpm and
// swtpm_setup write), so that state moves between swtpm and cvtpm in both
// directions. The protocol server (vtpm/swtpmproto) and the state store
// (vtpm/statestore, importing a swtpm directory) both use it.
package swtpmblob

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// swtpm's state-blob framing (src/swtpm/swtpm_nvstore.c and tlv.h): a
// 10-byte header (u8 version, u8 min_version, u16 hdrsize, u16 flags,
// u32 totlen, big-endian) and, for version 2, TLVs (u16 tag, u32 length).
const (
	blobHeaderLen     = 10
	blobHeaderVersion = 2

	blobFlagEncrypted          = 0x01
	blobFlagMigrationEncrypted = 0x02
	blobFlagMigrationData      = 0x04
	blobFlagMigration256BitKey = 0x10

	tagData                   = 1
	tagMigrationData          = 4
	tagEncryptedMigrationData = 5
)

// Encode frames a plain libtpms blob as swtpm sends it in
// CMD_GET_STATEBLOB; with a sealer the inner data is sealed (our AEAD framing,
// flagged as migration-encrypted).
func Encode(plain []byte, sealer Sealer) ([]byte, error) {
	inner := appendTLV(nil, tagData, plain)
	flags := uint16(blobFlagMigrationData)
	var body []byte
	if sealer != nil {
		sealed, err := sealer.Seal(inner)
		if err != nil {
			return nil, fmt.Errorf("sealing state blob with the migration key: %w", err)
		}
		flags |= blobFlagMigrationEncrypted | blobFlagMigration256BitKey
		body = appendTLV(nil, tagEncryptedMigrationData, sealed)
	} else {
		body = appendTLV(nil, tagMigrationData, inner)
	}
	out := make([]byte, blobHeaderLen, blobHeaderLen+len(body))
	out[0] = blobHeaderVersion
	out[1] = 1
	binary.BigEndian.PutUint16(out[2:], blobHeaderLen)
	binary.BigEndian.PutUint16(out[4:], flags)
	binary.BigEndian.PutUint32(out[6:], uint32(blobHeaderLen+len(body)))
	return append(out, body...), nil
}

// Sealer seals and opens blobs with a migration key (statestore.Key does).
type Sealer interface {
	Seal(plain []byte) ([]byte, error)
	Open(sealed []byte) ([]byte, error)
}

// Errors of Decode.
var (
	ErrBlobHeader     = errors.New("bad state blob header")
	ErrBlobNeedsKey   = errors.New("state blob is encrypted with a key this TPM does not have")
	ErrBlobStateKeyed = errors.New("state blob is encrypted with swtpm's state key (--key); transfer it decrypted")
)

// Decode undoes Encode, and also reads swtpm's
// unencrypted transfer blobs and state files (tpm2-00.*, which lack the
// migration wrapper): it returns the plain libtpms blob.
func Decode(b []byte, sealer Sealer) ([]byte, error) {
	if len(b) < blobHeaderLen {
		return nil, fmt.Errorf("%w: %d bytes, need at least %d", ErrBlobHeader, len(b), blobHeaderLen)
	}
	version, minVersion := b[0], b[1]
	hdrsize := binary.BigEndian.Uint16(b[2:])
	flags := binary.BigEndian.Uint16(b[4:])
	totlen := binary.BigEndian.Uint32(b[6:])
	switch {
	case int(totlen) != len(b):
		return nil, fmt.Errorf("%w: total length %d but %d bytes", ErrBlobHeader, totlen, len(b))
	case minVersion > blobHeaderVersion:
		return nil, fmt.Errorf("%w: needs version %d, we support %d", ErrBlobHeader, minVersion, blobHeaderVersion)
	case hdrsize != blobHeaderLen:
		return nil, fmt.Errorf("%w: header size %d, want %d", ErrBlobHeader, hdrsize, blobHeaderLen)
	}
	data := b[blobHeaderLen:]
	if version < 2 {
		if flags&(blobFlagEncrypted|blobFlagMigrationEncrypted) != 0 {
			return nil, ErrBlobNeedsKey
		}
		return data, nil
	}
	var inner []byte
	if flags&blobFlagMigrationEncrypted != 0 {
		if sealer == nil {
			return nil, ErrBlobNeedsKey
		}
		sealed, err := findTLV(data, tagEncryptedMigrationData)
		if err != nil {
			return nil, err
		}
		if inner, err = sealer.Open(sealed); err != nil {
			return nil, fmt.Errorf("opening state blob with the migration key: %w", err)
		}
	} else if flags&blobFlagMigrationData != 0 {
		var err error
		if inner, err = findTLV(data, tagMigrationData); err != nil {
			return nil, err
		}
	} else {
		// swtpm's state file format (tpm2-00.*): the data TLV directly.
		inner = data
	}
	if flags&blobFlagEncrypted != 0 {
		return nil, ErrBlobStateKeyed
	}
	return findTLV(inner, tagData)
}

func appendTLV(dst []byte, tag uint16, v []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, tag)
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(v)))
	return append(dst, v...)
}

func findTLV(b []byte, tag uint16) ([]byte, error) {
	for len(b) > 0 {
		if len(b) < 6 {
			return nil, fmt.Errorf("%w: truncated TLV header", ErrBlobHeader)
		}
		t := binary.BigEndian.Uint16(b)
		n := binary.BigEndian.Uint32(b[2:])
		if uint64(n) > uint64(len(b)-6) {
			return nil, fmt.Errorf("%w: TLV tag %d length %d exceeds the %d bytes left", ErrBlobHeader, t, n, len(b)-6)
		}
		if t == tag {
			return b[6 : 6+n], nil
		}
		b = b[6+n:]
	}
	return nil, fmt.Errorf("%w: no TLV with tag %d", ErrBlobHeader, tag)
}
