package swtpmblob

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
)

// rawBlob builds a swtpm blob header (version, flags) in front of body.
func rawBlob(version byte, flags uint16, body []byte) []byte {
	b := []byte{version, 1, 0, 10}
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint32(b, uint32(10+len(body)))
	return append(b, body...)
}

func TestDecode(t *testing.T) {
	plain := []byte("libtpms permanent state")
	ours, err := Encode(plain, nil)
	if err != nil {
		t.Fatal(err)
	}
	truncated := ours[:len(ours)-1]
	tests := []struct {
		name    string
		blob    []byte
		want    []byte
		wantErr error
	}{
		{"transfer blob (header, migration TLV, data TLV)", ours, plain, nil},
		{"swtpm state file (tpm2-00.permall)", rawBlob(2, 0, appendTLV(nil, tagData, plain)), plain, nil},
		{"header version 1: raw data", rawBlob(1, 0, plain), plain, nil},
		{"truncated", truncated, nil, ErrBlobHeader},
		{"too short", []byte{2, 1, 0}, nil, ErrBlobHeader},
		{"future min version", append([]byte{3, 3}, ours[2:]...), nil, ErrBlobHeader},
		{"migration-encrypted without a key", rawBlob(2, blobFlagMigrationEncrypted|blobFlagMigrationData, appendTLV(nil, tagEncryptedMigrationData, []byte("x"))), nil, ErrBlobNeedsKey},
		{"encrypted with swtpm's state key", rawBlob(2, blobFlagEncrypted|blobFlagMigrationData, appendTLV(nil, tagMigrationData, appendTLV(nil, 2, []byte("x")))), nil, ErrBlobStateKeyed},
		{"TLV length past the end", rawBlob(2, 0, []byte{0, 1, 0, 0, 1, 0, 'x'}), nil, ErrBlobHeader},
	}
	for _, tc := range tests {
		got, err := Decode(tc.blob, nil)
		if tc.wantErr != nil {
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("%s: err %v, want %v", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil || !bytes.Equal(got, tc.want) {
			t.Errorf("%s: got %q, %v; want %q", tc.name, got, err, tc.want)
		}
	}
}

func FuzzDecode(f *testing.F) {
	good, _ := Encode([]byte("libtpms state"), nil)
	f.Add(good)
	f.Add([]byte{1, 1, 0, 10, 0, 0, 0, 0, 0, 12, 'x', 'y'})
	f.Add([]byte{2, 1, 0, 10, 0, 2, 0, 0, 0, 10})
	f.Fuzz(func(t *testing.T, b []byte) {
		plain, err := Decode(b, nil)
		if err != nil {
			return
		}
		again, err := Encode(plain, nil)
		if err != nil {
			t.Fatal(err)
		}
		if p2, err := Decode(again, nil); err != nil || !bytes.Equal(p2, plain) {
			t.Fatalf("re-encoded blob does not decode to the same data: %v", err)
		}
	})
}
