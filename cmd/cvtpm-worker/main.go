// Command cvtpm-worker is one vTPM instance of a cvtpm backend (package
// vtpm/worker), started by "cvtpm backend" with its state key on an
// inherited descriptor. It is its own small binary so that an idle
// instance costs little memory: it links only the TPM engine, the state
// store and the call protocol, none of the backend's gRPC, TLS, database
// or metrics code.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cvtpm/vtpm/worker"
)

func main() {
	// The supervisor ends a worker by closing its socket, after it has
	// asked for the state generation it anchors on the way out; a Ctrl-C
	// or a service manager's SIGTERM sent to the whole process group must
	// not end the workers first. Ignored, not caught: catching a signal
	// costs an idle worker two more threads (Go's signal watcher is a
	// goroutine locked to its own thread).
	signal.Ignore(os.Interrupt, syscall.SIGTERM)
	err := worker.Run(context.Background(), os.Args[1:])
	switch {
	case errors.Is(err, worker.ErrUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintf(os.Stderr, "cvtpm-worker: %v\n", err)
		os.Exit(1)
	}
}
