package pump

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Every relayed pair now costs an OS thread, and the relay admits up to
// Max (4096) pairs, 64 per guest. Where the service has a task limit
// (systemd's TasksMax, a container's pids.max, ulimit -u), guests'
// connections take the tasks the Go runtime itself needs: Run does fall
// back when pthread_create fails, but the next time the runtime needs a
// thread (a blocking system call, a locked goroutine, GC workers) it
// cannot get one and the process dies ("failed to create new OS
// thread" / "pthread_create failed"), taking every VM's relay with it.
//
// The child runs as nobody with RLIMIT_NPROC a little above its own
// threads, starts pumps until Run reports ErrUnsupported (exactly what
// Relay handles), and then does what any Go process does now and then:
// blocking system calls on a few goroutines.
func TestReviewPumpThreadsStarveRuntime(t *testing.T) {
	if os.Getenv("REVIEW_PUMP_CHILD") == "1" {
		reviewPumpChild(t)
		return
	}
	if os.Getuid() != 0 {
		t.Skip("needs root to run the child as another user (RLIMIT_NPROC does not bind root)")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "review-pump-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "pump.test")
	data, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(pumps bool) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "-test.run=^TestReviewPumpThreadsStarveRuntime$", "-test.v")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "REVIEW_PUMP_CHILD=1", "GOTRACEBACK=single", fmt.Sprintf("REVIEW_PUMP_PUMPS=%v", pumps))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// Control: the same child without pumps lives.
	if s, err := run(false); err != nil || !strings.Contains(s, "review child: survived") {
		t.Fatalf("control child (no pumps): %v\n%s", err, s)
	}
	s, err := run(true)
	lines := strings.Split(s, "\n")
	for _, l := range lines {
		if strings.Contains(l, "review child") || strings.Contains(l, "OS thread") || strings.Contains(l, "pthread_create") || strings.Contains(l, "fatal") {
			t.Log(l)
		}
	}
	if strings.Contains(s, "failed to create new OS thread") || strings.Contains(s, "pthread_create failed") || strings.Contains(s, "newosproc") {
		t.Fatalf("the process died when its pump threads had taken the task limit (child: %v)", err)
	}
	if err != nil || !strings.Contains(s, "review child: survived") {
		t.Fatalf("child: %v\n%s", err, s)
	}
}

func reviewPumpChild(t *testing.T) {
	base := ownThreads()
	limit := uint64(base + 40)
	if err := unix.Setrlimit(unix.RLIMIT_NPROC, &unix.Rlimit{Cur: limit, Max: limit}); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("review child: %d threads, RLIMIT_NPROC %d\n", base, limit)
	ctx := context.Background()
	started, fellBack := 0, false
	var keep []net.Conn
	for i := 0; i < 200 && !fellBack && os.Getenv("REVIEW_PUMP_PUMPS") == "true"; i++ {
		client, a, b, server := pair(t)
		keep = append(keep, client, server)
		errc := make(chan error, 1)
		go func() { errc <- Run(ctx, a.(*net.TCPConn), b.(*net.TCPConn)) }()
		// Wait until this pair is relaying (or Run fell back).
		go client.Write([]byte("x"))
		server.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.ReadFull(server, make([]byte, 1)); err == nil {
			started++
			continue
		}
		select {
		case err := <-errc:
			if errors.Is(err, ErrUnsupported) {
				fellBack = true
				fmt.Printf("review child: Run fell back after %d pump threads: %v\n", started, err)
			}
		case <-time.After(time.Second):
		}
	}
	// Now what any Go program does now and then: goroutines in blocking
	// system calls, each holding its thread while the runtime hands its P
	// to another (new) thread.
	for i := 0; i < 8; i++ {
		var p [2]int
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		go func() { unix.Read(p[0], make([]byte, 1)) }()
	}
	done := time.After(time.Second)
	for spin := true; spin; {
		select {
		case <-done:
			spin = false
		default:
			go func() {}()
			time.Sleep(time.Millisecond)
		}
	}
	fmt.Printf("review child: survived with %d threads\n", ownThreads())
	_ = keep
}
