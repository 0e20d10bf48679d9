package backend

// Third adversarial review, finding (low): a taken-over worker writes the
// backend's log. A worker's stderr is a pipe that the supervisor copies,
// byte for byte, to its own stderr (lastLine), which is where the
// backend's own slog records go (internal/obs). A worker can therefore
// write records that are indistinguishable from the supervisor's, about
// any instance ("state transfer" of another instance, "instance deleted",
// a quiet log where refusals were), and as many as it likes (the
// supervisor rate-limits its own refusal lines, logfield.Limiter, but not
// a worker's stderr; journald's per-unit rate limit then drops the
// supervisor's real records too). The README: "State transfers are what a
// hostile host tries: every outcome is on record."

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

const review3Forged = `time=2030-01-01T00:00:00.000Z level=INFO msg="state transfer" instance=vm2 op=set-state blob=1`

func review3LogForger(ctl string) {
	for {
		if _, err := os.Stat(filepath.Join(ctl, "go")); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	os.Stderr.WriteString(review3Forged + "\n")
}

func TestReview3WorkerForgesBackendLog(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, ".review3")
	if err := os.Mkdir(ctl, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("REVIEW3_MODE", "logforge")
	t.Setenv("REVIEW3_CTL", ctl)
	t.Setenv("REVIEW3_EVIL_ID", "vm1")
	// The backend's stderr, where its own records go.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stderr
	os.Stderr = w
	var mu sync.Mutex
	var got bytes.Buffer
	done := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			mu.Lock()
			got.Write(buf[:n])
			mu.Unlock()
			if err == io.EOF || err != nil {
				close(done)
				return
			}
		}
	}()
	s := testBinarySupervisor(t, Config{Dir: dir, CallTimeout: 5 * time.Second})
	ctx := context.Background()
	for _, id := range []string{"vm1", "vm2"} {
		if _, err := s.Create(ctx, id, CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(ctl, "go"), nil, 0o600)
	time.Sleep(300 * time.Millisecond)
	s.Close()
	os.Stderr = saved
	w.Close()
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, line := range strings.Split(got.String(), "\n") {
		if line == review3Forged {
			t.Errorf("the backend's stderr holds, as a line of its own, a record that vm1's worker wrote about vm2: %q", line)
		}
	}
}
