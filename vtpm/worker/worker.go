// Package worker is one vTPM instance of a backend, in a process of its
// own: a libtpms TPM on sealed state, answering vtpm/tpmrpc calls from
// the supervisor on an inherited socket. It links only the engine, the
// state store, sealed migration and the call protocol, so that the small
// cvtpm-worker binary (cmd/cvtpm-worker) that runs it holds little memory
// when idle: hundreds of them run on one backend.
package worker

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"

	"cvtpm/internal/confine"
	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/engine/memstore"
	"cvtpm/vtpm/migration"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/tpmrpc"
)

// ErrUsage: the flags were wrong (flag printed why).
var ErrUsage = errors.New("usage")

// Run is the worker: args are its command-line flags (see Usage).
func Run(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cvtpm-worker", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: cvtpm-worker --state DIR --instance ID --conn-fd N --state-key-fd M
                    [--cipher aes-256-gcm|sm4-gcm] [--new] [--import-swtpm] [--seccomp kill|log]
       cvtpm-worker --spare --conn-fd N --state-key-fd M

Runs one libtpms TPM whose sealed state lives in DIR and answers vtpm/tpmrpc
calls on the inherited socket N. The hex state key is read from the
inherited descriptor M and never appears on a command line. The worker
never holds the backend's migration key: its state leaves and enters the
backend sealed for this instance by the supervisor (vtpm/migration).
Before anything else the worker moves into a mount namespace that holds
its --state-root and nothing else, drops every capability and turns
non-dumpable; once it has its key it keeps only the system calls
that serving its instance takes (internal/confine): no new sockets or
connections, no ioctl, no exec, no signals or ptrace to other processes.
'cvtpm backend' starts one worker per instance; there is no reason to run
it by hand.

Options:
`)
		fs.PrintDefaults()
	}
	dir := fs.String("state", "", "the instance's state directory")
	fs.String("state-root", "", "the directory that holds every instance's state (the backend's --dir), an absolute path without symlinks: the only part of the file system the worker sees (read before Go starts, internal/confine)")
	connFD := fs.Int("conn-fd", -1, "inherited socket for tpmrpc calls")
	keyFD := fs.Int("state-key-fd", -1, "inherited descriptor with the hex state key")
	cipher := fs.String("cipher", "aes-256-gcm", "state AEAD: aes-256-gcm or sm4-gcm")
	instance := fs.String("instance", "", "the instance's id (bound into migrated state)")
	isNew := fs.Bool("new", false, "the instance is being created: an empty state directory is expected")
	minGen := fs.Uint64("min-generation", 0, "a new instance starts its state generation here (above an anchor its id had before)")
	importSwtpm := fs.Bool("import-swtpm", false, "import swtpm's unencrypted tpm2-00.* files from the state directory (administrator's import)")
	deferManifest := fs.Bool("defer-manifest", false, "with --new: the new store's manifest is written with its first blob (the TPM is initialised right away), not at once")
	seccompMode := fs.String("seccomp", string(confine.ModeKill), "what a system call outside the worker's list gets once it serves: kill (the process) or log (allowed, logged by the kernel; for finding what a new platform needs)")
	spare := fs.Bool("spare", false, "started ahead of need: read the other flags (--state, --instance, ...) from the socket --conn-fd, as one message, before anything else")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return ErrUsage
	}
	if *connFD < 0 {
		return errors.New("--conn-fd is required (see --help)")
	}
	mode, err := confine.ParseMode(*seccompMode)
	if err != nil {
		return fmt.Errorf("--seccomp: %w", err)
	}
	// An idle instance should cost little: one P, and a small heap target.
	// (A spare sets this while it waits, not while its instance starts.)
	runtime.GOMAXPROCS(1)
	debug.SetGCPercent(50)
	conn := os.NewFile(uintptr(*connFD), "tpmrpc")
	if conn == nil {
		return fmt.Errorf("--conn-fd %d: not a descriptor", *connFD)
	}
	// conn is not closed on return: it closes when the process exits,
	// after the error that ended it is written, so the supervisor (which
	// ends the worker when conn breaks) gets to read why.
	if *spare {
		// The supervisor sends this worker's instance when it needs one;
		// until then the worker has started and holds nothing.
		warmUp()
		more, err := readFlags(conn)
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil // the supervisor ended without using it
			}
			return fmt.Errorf("reading the instance's flags: %w", err)
		}
		if err := fs.Parse(more); err != nil || fs.NArg() > 0 {
			return fmt.Errorf("the instance's flags %q: %v", more, err)
		}
	}
	if *dir == "" || *keyFD < 0 || *instance == "" {
		return errors.New("--state, --instance, --conn-fd and --state-key-fd are required (see --help)")
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("instance", *instance)

	key, err := statestore.KeyFromFD(*keyFD, "hex", *cipher)
	if err != nil {
		return fmt.Errorf("state key: %w", err)
	}
	// From here on the worker reads state from a disk the host holds and
	// runs commands that the host and the guest send (libtpms parses both):
	// it keeps only the system calls serving them takes.
	if err := confine.Worker(mode); err != nil {
		if !errors.Is(err, confine.ErrUnsupported) {
			return err
		}
		log.Warn("this worker runs without a seccomp filter (there is none for this platform)")
	}
	// An existing instance's state must be there: an emptied directory is
	// the host's doing, not a new TPM.
	store, err := statestore.Open(*dir, statestore.Options{Key: key, Lock: true, Logger: log,
		MustExist: !*isNew && !*importSwtpm, ImportSwtpm: *importSwtpm, DeferManifest: *isNew && *deferManifest})
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	defer store.Close()
	if err := store.RaiseGeneration(*minGen); err != nil {
		return fmt.Errorf("state: %w", err)
	}
	eng, err := engine.New(store, log)
	if err != nil {
		return err
	}
	defer eng.Close()
	tpm := &migration.TPM{TPM: eng, Store: store, Logger: log}
	// One thread waits in ppoll on the supervisor's socket and the direct
	// sessions (serve.go): a blocking wait wakes faster than the
	// netpoller. The supervisor closing its end (EOF) is the normal way
	// to stop.
	err = newServer(tpm, eng.Locality, conn, log).run()
	runtime.KeepAlive(conn)
	return err
}

// readFlags reads a spare's flags: one tpmrpc-framed message holding them
// separated by NUL bytes.
func readFlags(r io.Reader) ([]string, error) {
	msg, err := tpmrpc.ReadMessage(r, nil)
	if err != nil {
		return nil, err
	}
	if len(msg) == 0 {
		return nil, nil
	}
	return strings.Split(string(msg), "\x00"), nil
}

// warmUp makes and ends a throwaway TPM on an in-memory store, with no
// instance's key or state: a process's first libtpms manufacture costs
// about 4 ms of page faults and OpenSSL set-up, the next ones 0.1 ms, and
// a spare pays that while it waits rather than while an instance is
// being created.
func warmUp() {
	eng, err := engine.New(memstore.New(), nil)
	if err != nil {
		return
	}
	eng.Init(0)
	eng.Close()
}
