package main

// "cvtpm worker": one vTPM instance, started by "cvtpm backend" when the
// lean cvtpm-worker binary is not beside cvtpm (vtpm/worker).

import (
	"context"
	"errors"

	"cvtpm/vtpm/worker"
)

func init() {
	register(command{name: "worker", summary: "(internal) one vTPM instance of a backend; started by 'cvtpm backend'", run: runWorker})
}

func runWorker(ctx context.Context, args []string) error {
	err := worker.Run(ctx, args)
	if errors.Is(err, worker.ErrUsage) {
		return exitError{2}
	}
	return err
}
