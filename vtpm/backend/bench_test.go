package backend

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/gcm"
	"cvtpm/test/testenv"
	"cvtpm/vtpm/tpmrpc"
)

// BenchmarkSupervisorGetRandom is one small command from the supervisor
// to a worker process (the lean cvtpm-worker beside cvtpm) and back: the
// backend's share of the attested path.
func BenchmarkSupervisorGetRandom(b *testing.B) {
	keys, _ := NewMasterKey(bytesOf(1, 32))
	s, err := New(context.Background(), Config{Dir: b.TempDir(), Keys: keys, Worker: []string{filepath.Join(filepath.Dir(testenv.Binary(b, testenv.Cvtpm)), "cvtpm-worker")}})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	tpm := s.TPM("vm1", tpmrpc.Roles["host"])
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDirectSessionGetRandom is one small command through a direct
// session: the link's client in this process -> the worker process and
// back, the supervisor off the path (compare BenchmarkSupervisorGetRandom,
// and internal/attestedlink's BenchmarkCall for the link alone).
func BenchmarkDirectSessionGetRandom(b *testing.B) {
	f := newLinkFixture(b, `{"clients": {"frontend": {"instances": ["vm1"], "capabilities": ["host"]}}}`)
	if _, err := f.s.Create(context.Background(), "vm1", CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	host := f.s.TPM("vm1", tpmrpc.Roles["host"])
	if rc := host.Init(0); rc != 0 {
		b.Fatalf("init: %#x", rc)
	}
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(host); err != nil {
		b.Fatal(err)
	}
	d := openDirect(b, f, f.addr, gcm.AES256)
	getRandom := marshalCommand(b, tpm2.GetRandom{BytesRequested: 8})
	b.ResetTimer()
	for range b.N {
		resp, err := directExecute(d, getRandom)
		if err != nil || resp.Err != "" {
			b.Fatalf("%v %s", err, resp.Err)
		}
	}
}
