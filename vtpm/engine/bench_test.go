package engine

import (
	"testing"

	"github.com/google/go-tpm/tpm2"
)

// benchTPM is a started TPM on an in-memory store.
func benchTPM(b *testing.B) *TPM {
	tpm, err := New(newMem(), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(tpm.Close)
	if rc := tpm.Init(0); rc != 0 {
		b.Fatalf("Init: rc 0x%x", rc)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(transportOf(tpm)); err != nil {
		b.Fatal(err)
	}
	return tpm
}

// BenchmarkExecute is libtpms itself through the engine, without any I/O:
// the floor under every transport's latency for these commands.
func BenchmarkExecute(b *testing.B) {
	getRandom, _ := commandBytes(tpm2.GetRandom{BytesRequested: 8})
	extend, _ := commandBytes(tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(16), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: make([]byte, 32)}}},
	})
	for _, tc := range []struct {
		name string
		cmd  []byte
	}{{"GetRandom8", getRandom}, {"PCRExtendSHA256", extend}} {
		b.Run(tc.name, func(b *testing.B) {
			tpm := benchTPM(b)
			var out []byte
			for b.Loop() {
				out = tpm.Execute(out[:0], tc.cmd)
				if rcOf(out) != 0 {
					b.Fatalf("rc 0x%x", rcOf(out))
				}
			}
		})
	}
}
