package main

// "cvtpm socket": the drop-in for "swtpm socket --tpm2" (vtpm/swtpmsocket).

import (
	"context"
	"errors"

	"cvtpm/vtpm/swtpmsocket"
)

func init() {
	register(command{
		name:    "socket",
		summary: "TPM 2.0 on swtpm's control/data sockets (drop-in for 'swtpm socket --tpm2')",
		run:     runSocket,
	})
}

func runSocket(ctx context.Context, args []string) error {
	err := swtpmsocket.Run(ctx, args)
	var e swtpmsocket.ExitError
	if errors.As(err, &e) {
		return exitError{int(e)}
	}
	return err
}
