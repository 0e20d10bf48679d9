package statestore

import (
	"bytes"
	"testing"
)

// FuzzOpenFile feeds arbitrary bytes to the state file parser, with and
// without a key. It must never panic, and anything it accepts must be what
// seal produced.
func FuzzOpenFile(f *testing.F) {
	key, _ := NewKey(bytes.Repeat([]byte{1}, 32), "aes-256-gcm")
	for _, k := range []*Key{nil, key} {
		for _, id := range []uint16{0, 1, 2} {
			b, _ := seal(k, id, 7, []byte("seed payload"))
			f.Add(b, k != nil, id)
		}
	}
	manifest, _ := seal(nil, 0, 3, marshalManifest(map[string]manifestEntry{"permall": {3, true}}))
	f.Add(manifest, false, uint16(0))
	f.Add([]byte("CVTPMST\x00"), false, uint16(1))
	f.Fuzz(func(t *testing.T, b []byte, sealed bool, id uint16) {
		var k *Key
		if sealed {
			k = key
		}
		plain, gen, err := open(k, id, b)
		if err != nil {
			return
		}
		if k == nil {
			// Unsealed files are checksummed, not authenticated: a valid
			// one must re-marshal to the same bytes.
			again, _ := seal(nil, id, gen, plain)
			if !bytes.Equal(again, b) {
				t.Fatalf("accepted file does not round-trip")
			}
		}
		if id == 0 {
			parseManifest(plain)
		}
	})
}

// FuzzOpenTransfer feeds arbitrary bytes to the migration envelope parser
// (what the host hands to SET_STATEBLOB). It must never panic, and nothing
// but what SealTransfer made for this instance and blob may open.
func FuzzOpenTransfer(f *testing.F) {
	key, _ := NewKey(bytes.Repeat([]byte{2}, 32), "sm4-gcm")
	env, _ := key.SealTransfer("vm1", "permall", 9, []byte("state"))
	f.Add(env)
	f.Add(env[:headerLen])
	stateFile, _ := seal(key, 1, 1, []byte("state"))
	f.Add(stateFile)
	f.Add([]byte("\x02\x01\x00\x0aplain"))
	f.Fuzz(func(t *testing.T, b []byte) {
		plain, gen, err := key.OpenTransfer("vm1", "permall", b)
		if err != nil {
			return
		}
		// (env differs per fuzz worker: the nonce is random.)
		if string(plain) != "state" || gen != 9 {
			t.Fatalf("opened an envelope SealTransfer did not make: gen %d, %q", gen, plain)
		}
	})
}
