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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := worker.Run(ctx, os.Args[1:])
	stop()
	switch {
	case errors.Is(err, worker.ErrUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintf(os.Stderr, "cvtpm-worker: %v\n", err)
		os.Exit(1)
	}
}
