package test

import (
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

// TestKillDuringNVWrites kills cvtpm (sealed state) with SIGKILL at random
// instants while tpm2_nvwrite writes a counter; after each kill the state
// must open, and the NV index must hold a value at least as new as the last
// write tpm2_nvwrite reported as done.
func TestKillDuringNVWrites(t *testing.T) {
	state := t.TempDir()
	keyFile := filepath.Join(t.TempDir(), "key")
	os.WriteFile(keyFile, []byte(strings.Repeat("a5", 32)), 0o600)
	opts := testenv.Options{StateDir: state, ExtraArgs: []string{"--key", "file=" + keyFile + ",mode=sm4-gcm"}}
	dir := t.TempDir()
	nvwrite := testenv.Tool(t, "tpm2_nvwrite")

	srv := testenv.StartSocket(t, testenv.Cvtpm, opts)
	tt := tools{tb: t, tcti: srv.TCTI(), dir: dir}
	tt.run("tpm2_nvdefine", "0x1500021", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")

	var acked atomic.Uint64
	next := uint64(1)
	for round := range 8 {
		stop := make(chan struct{})
		done := make(chan struct{})
		tcti := srv.TCTI()
		go func() {
			defer close(done)
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				v := next
				f := filepath.Join(dir, "v")
				os.WriteFile(f, binary.BigEndian.AppendUint64(nil, v), 0o600)
				if _, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tcti}, nvwrite, "0x1500021", "-C", "o", "-i", f); err != nil {
					return // the server died under us
				}
				acked.Store(v)
				next++
			}
		}()
		time.Sleep(time.Duration(50+rand.IntN(250)) * time.Millisecond)
		srv.Kill(t)
		close(stop)
		<-done

		srv = testenv.StartSocket(t, testenv.Cvtpm, opts)
		tt.tcti = srv.TCTI()
		out, err := testenv.RunErr([]string{"TPM2TOOLS_TCTI=" + tt.tcti}, "tpm2_nvread", "0x1500021", "-C", "o", "-s", "8", "-o", tt.path("out"))
		if err != nil && acked.Load() == 0 && strings.Contains(out, "0x0000014a") {
			// Killed before the first write completed (a slow machine): the
			// index is defined but never written, which is right.
			continue
		}
		if err != nil {
			t.Fatalf("round %d: tpm2_nvread: %v\n%s", round, err, out)
		}
		b, _ := os.ReadFile(tt.path("out"))
		if len(b) != 8 {
			t.Fatalf("round %d: NV holds %d bytes", round, len(b))
		}
		got := binary.BigEndian.Uint64(b)
		if got < acked.Load() || got > next {
			t.Fatalf("round %d: NV holds %d; last acknowledged write %d, last attempted %d", round, got, acked.Load(), next)
		}
		next = max(next, got+1)
	}
	if acked.Load() < 8 {
		t.Fatalf("only %d writes were acknowledged: the test exercised little", acked.Load())
	}
}
