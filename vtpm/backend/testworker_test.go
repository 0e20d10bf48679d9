package backend

// Workers started from this test binary, for the reviews' end-to-end
// attacks: the workers are this binary, so that they run the real worker
// (vtpm/worker.Run: the C constructor's mount namespace and capability
// drop, the real seccomp filter) together with attacker code that does
// what code execution gained through a libtpms bug could do with the
// allowed system calls. testBinarySupervisor starts a backend that uses
// them; each review's test says by environment which attack its workers
// carry:
//
//   - REVIEW_EVIL_WORKER_DIR: review 1, steal a spare's key pipe
//     (review_confine_test.go);
//   - REVIEW2_HANG_DIR: review 2, a worker that stops itself
//     (review_confine2_test.go);
//   - REVIEW3_MODE and REVIEW3_CTL: review 3, in the worker that serves
//     REVIEW3_EVIL_ID only (review3_*_test.go). A spare's flags are read
//     here (as Run would) so that the harness knows which instance it
//     serves.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/vtpm/tpmrpc"
	vtpmworker "cvtpm/vtpm/worker"
)

func init() {
	if !slices.Contains(os.Args, "--conn-fd") {
		return // the test binary itself
	}
	args := slices.Clone(os.Args[1:])
	if dir := os.Getenv("REVIEW_EVIL_WORKER_DIR"); dir != "" {
		go reviewEvil(dir)
	}
	if dir := os.Getenv("REVIEW2_HANG_DIR"); dir != "" {
		go review2Stopper(dir)
	}
	if mode, ctl := os.Getenv("REVIEW3_MODE"), os.Getenv("REVIEW3_CTL"); mode != "" && ctl != "" {
		args = review3Worker(args, mode, ctl)
	}
	if err := vtpmworker.Run(context.Background(), args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// testBinarySupervisor starts a backend whose workers are this test binary
// (see init), with cfg's settings; Keys defaults to a fixed master key.
func testBinarySupervisor(t *testing.T, cfg Config) *Supervisor {
	t.Helper()
	if cfg.Keys == nil {
		keys, err := NewMasterKey(bytesOf(1, 32))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Keys = keys
	}
	cfg.Worker = []string{os.Args[0]}
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// review3Worker arms review 3's attack in the worker that serves
// REVIEW3_EVIL_ID, and returns the flags to run it with.
func review3Worker(args []string, mode, ctl string) []string {
	if i := slices.Index(args, "--spare"); i >= 0 {
		args = slices.Delete(args, i, i+1)
		msg, err := tpmrpc.ReadMessage(os.NewFile(3, "conn"), nil)
		if err != nil {
			os.Exit(0)
		}
		args = append(args, strings.Split(string(msg), "\x00")...)
	}
	i := slices.Index(args, "--instance")
	if i < 0 || i+1 >= len(args) || args[i+1] != os.Getenv("REVIEW3_EVIL_ID") {
		return args
	}
	switch mode {
	case "slowgen":
		args = review3SlowGeneration(args, ctl)
	case "symlink":
		go review3SymlinkRacer(ctl)
	case "logforge":
		go review3LogForger(ctl)
	}
	return args
}

// review3SlowGeneration stands for a worker whose serve loop the attacker
// patched: every answer goes out at once except the answer to the
// supervisor's OpGeneration call, which is held back for REVIEW3_DELAY
// (below CallTimeout, so the worker is never killed) once the test says so
// (a file "slow" in ctl). Scaffolding: the socketpair between the real
// socket and the real serve loop is made here, before the filter; after
// it only read, write and nanosleep are used (all allowed).
func review3SlowGeneration(args []string, ctl string) []string {
	delay, _ := time.ParseDuration(os.Getenv("REVIEW3_DELAY"))
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		panic(err)
	}
	real := os.NewFile(3, "conn")
	inner := os.NewFile(uintptr(fds[0]), "inner")
	ops := make(chan tpmrpc.Op, 16)
	go func() {
		defer inner.Close()
		for {
			msg, err := tpmrpc.ReadMessage(real, nil)
			if err != nil || len(msg) == 0 {
				return
			}
			ops <- tpmrpc.Op(msg[0])
			if _, err := inner.Write(append(binaryLen(len(msg)), msg...)); err != nil {
				return
			}
		}
	}()
	go func() {
		for {
			msg, err := tpmrpc.ReadMessage(inner, nil)
			if err != nil {
				os.Exit(0)
			}
			if op := <-ops; op == tpmrpc.OpGeneration {
				if _, err := os.Stat(filepath.Join(ctl, "slow")); err == nil {
					time.Sleep(delay)
				}
			}
			if _, err := real.Write(append(binaryLen(len(msg)), msg...)); err != nil {
				os.Exit(0)
			}
		}
	}()
	i := slices.Index(args, "--conn-fd")
	args[i+1] = fmt.Sprint(fds[1])
	return args
}

func binaryLen(n int) []byte { return []byte{byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)} }
