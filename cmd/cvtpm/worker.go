package main

// "cvtpm worker": one vTPM instance, started by "cvtpm backend".

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/tpmrpc"
)

func init() {
	register(command{name: "worker", summary: "(internal) one vTPM instance of a backend; started by 'cvtpm backend'", run: runWorker})
}

func runWorker(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm worker", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm worker --state DIR --conn-fd N --key-fd M [--cipher aes-256-gcm|sm4-gcm]

Runs one libtpms TPM whose sealed state lives in DIR and answers vtpm/tpmrpc
calls on the inherited socket N. The hex state key is read from the
inherited descriptor M and never appears on a command line. 'cvtpm backend'
starts one worker per instance; there is no reason to run it by hand.

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("state", "", "the instance's state directory")
	connFD := fs.Int("conn-fd", -1, "inherited socket for tpmrpc calls")
	keyFD := fs.Int("key-fd", -1, "inherited descriptor with the hex state key")
	cipher := fs.String("cipher", "aes-256-gcm", "state AEAD: aes-256-gcm or sm4-gcm")
	if done, err := parseFlags(fs, args); done {
		return err
	}
	if *dir == "" || *connFD < 0 || *keyFD < 0 {
		return errors.New("--state, --conn-fd and --key-fd are required (see --help)")
	}
	// An idle instance should cost little: one P, and a small heap target.
	runtime.GOMAXPROCS(1)
	debug.SetGCPercent(50)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("instance", os.Getenv("CVTPM_INSTANCE"))

	key, err := statestore.KeyFromFD(*keyFD, "hex", *cipher)
	if err != nil {
		return fmt.Errorf("state key: %w", err)
	}
	store, err := statestore.Open(*dir, statestore.Options{Key: key, Lock: true, Logger: log})
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	defer store.Close()
	tpm, err := engine.New(store, log)
	if err != nil {
		return err
	}
	defer tpm.Close()
	// A blocking descriptor read directly: the supervisor is the only
	// peer, and a plain read wakes faster than the netpoller. The
	// supervisor closing its end (EOF) is the normal way to stop.
	conn := os.NewFile(uintptr(*connFD), "tpmrpc")
	if conn == nil {
		return fmt.Errorf("--conn-fd %d: not a descriptor", *connFD)
	}
	defer conn.Close()
	return tpmrpc.ServeConn(ctx, conn, tpm)
}
