package backend

// Third adversarial review (dd29304): shared harness. The workers are this
// test binary: init runs the real worker (vtpm/worker.Run: the C
// constructor's mount namespace and capability drop, the real seccomp
// filter) and, in the worker that serves instance REVIEW3_EVIL_ID only,
// attacker code that does what code execution gained through a libtpms bug
// could do with the allowed system calls. A spare's flags are read here
// (as Run would) so that the harness knows which instance it serves.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"cvtpm/vtpm/tpmrpc"
	vtpmworker "cvtpm/vtpm/worker"
)

func init() {
	mode, ctl := os.Getenv("REVIEW3_MODE"), os.Getenv("REVIEW3_CTL")
	if mode == "" || ctl == "" || !slices.Contains(os.Args, "--conn-fd") {
		return
	}
	args := slices.Clone(os.Args[1:])
	if i := slices.Index(args, "--spare"); i >= 0 {
		args = slices.Delete(args, i, i+1)
		msg, err := tpmrpc.ReadMessage(os.NewFile(3, "conn"), nil)
		if err != nil {
			os.Exit(0)
		}
		args = append(args, strings.Split(string(msg), "\x00")...)
	}
	evil := false
	if i := slices.Index(args, "--instance"); i >= 0 && i+1 < len(args) && args[i+1] == os.Getenv("REVIEW3_EVIL_ID") {
		evil = true
	}
	if evil {
		switch mode {
		case "slowgen":
			args = review3SlowGeneration(args, ctl)
		case "symlink":
			go review3SymlinkRacer(ctl)
		case "logforge":
			go review3LogForger(ctl)
		}
	}
	if err := vtpmworker.Run(context.Background(), args); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
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
