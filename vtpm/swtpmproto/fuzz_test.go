package swtpmproto

import (
	"testing"

	"cvtpm/vtpm/engine"
)

func FuzzParseFrame(f *testing.F) {
	f.Add(tpm2GetRandom8)
	f.Add(append([]byte{0, 0, 0, 8, 0, 0, 0, 0, 12}, tpm2GetRandom8...))
	f.Add([]byte{0, 0, 0, 8, 9, 0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0x80, 0x01, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, need, err := ParseFrame(b, 4096+prefixLen)
		// The engine's stream loop parses the same bytes in C: it must
		// agree on every frame, every refusal and every byte it waits for.
		cPrefixed, cLoc, cStart, cEnd, cNeed := engine.ParseFrame(b, 4096+prefixLen)
		switch {
		case err != nil:
			if cNeed != 0 {
				t.Fatalf("Go refuses (%v), C needs %d", err, cNeed)
			}
		case cNeed != need:
			t.Fatalf("Go needs %d, C %d", need, cNeed)
		case len(b) >= need && (cPrefixed != fr.Prefixed || cLoc != fr.Locality || cStart != fr.Start || cEnd != fr.End):
			t.Fatalf("Go frame %+v, C prefixed=%v locality=%d %d..%d", fr, cPrefixed, cLoc, cStart, cEnd)
		}
		if err != nil {
			return
		}
		if need <= 0 || need > 4096+2*prefixLen {
			t.Fatalf("need %d out of range", need)
		}
		if len(b) >= need && (fr.Start > fr.End || fr.End > len(b) || fr.End-fr.Start < tpmHeaderLen) {
			t.Fatalf("frame %+v out of %d bytes", fr, len(b))
		}
	})
}

func FuzzParseMssimCommand(f *testing.F) {
	f.Add(append([]byte{0, 0, 0, 8, 0, 0, 0, 0, 12}, tpm2GetRandom8...))
	f.Add([]byte{0, 0, 0, 6, 0, 0, 0, 2, 'h', 'i'})
	f.Add([]byte{0, 0, 0, 15, 0, 0, 0, 1})
	f.Add([]byte{0, 0, 0, 20})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, need, err := ParseMssimCommand(b, 4096)
		if err != nil {
			return
		}
		if need <= 0 {
			t.Fatalf("need %d", need)
		}
		if len(b) >= need && m.End > len(b) {
			t.Fatalf("message end %d beyond %d bytes", m.End, len(b))
		}
	})
}

// FuzzControl feeds control messages to a server on a real engine.
func FuzzControl(f *testing.F) {
	f.Add(ctrlMsg(CmdGetCapability))
	f.Add(ctrlMsg(CmdInit, 0, 0, 0, 1))
	f.Add(ctrlMsg(CmdSetBufferSize, 0, 0, 0x10, 0))
	f.Add(ctrlMsg(CmdGetInfo, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 0))
	f.Add(ctrlMsg(CmdHashData, 0, 0, 0, 9, 1))
	f.Add(ctrlMsg(CmdSetStateBlob, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3))
	f.Add(ctrlMsg(CmdGetStateBlob, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0))
	f.Add(ctrlMsg(CmdResetTPMEstablished, 4))
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		f.Fatal(err)
	}
	defer tpm.Close()
	srv := New(tpm, Options{})
	var out []byte
	f.Fuzz(func(t *testing.T, msg []byte) {
		need := ControlNeed(msg)
		if need < 4 || need > 16+maxControlBody {
			t.Fatalf("ControlNeed = %d", need)
		}
		out, _ = srv.Control(out[:0], msg, -1)
		if len(out) < 4 {
			t.Fatalf("reply of %d bytes", len(out))
		}
	})
}
