package swtpmproto

import (
	"io"
	"net"
	"testing"
)

// BenchmarkGetRandomUnix measures one raw TPM2_GetRandom(8) round trip over
// a unix data socket to an in-process server on libtpms.
func BenchmarkGetRandomUnix(b *testing.B) {
	srv, ctrl, data := cvtpmServer(b)
	_ = srv
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrl, Net: "unix"})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	c.Write(ctrlMsg(CmdInit, 0, 0, 0, 0))
	c.Read(make([]byte, 4))
	d, err := net.Dial("unix", data)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	resp := make([]byte, 20)
	d.Write(tpm2StartupClr)
	d.Read(resp[:10])
	b.ResetTimer()
	for b.Loop() {
		if _, err := d.Write(tpm2GetRandom8); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(d, resp); err != nil {
			b.Fatal(err)
		}
	}
}
