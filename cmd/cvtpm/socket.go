package main

// "cvtpm socket": the drop-in for "swtpm socket --tpm2" (vtpm/swtpmsocket).

import (
	"context"
	"errors"
	"os"
	"syscall"

	"cvtpm/vtpm/swtpmsocket"
)

func init() {
	register(command{
		name:    "socket",
		summary: "TPM 2.0 on swtpm's control/data sockets (drop-in for 'swtpm socket --tpm2')",
		run:     runSocket,
	})
}

// leanSocketEnv, set to "off", keeps "cvtpm socket" in this binary.
const leanSocketEnv = "CVTPM_SOCKET_LEAN"

func runSocket(ctx context.Context, args []string) error {
	// The same server in bin/cvtpm-swtpm (built beside cvtpm) holds half
	// the memory for as long as the VM runs: this binary's gRPC, database
	// and CA code would stay resident in every vTPM process. The exec
	// keeps the PID, the arguments, the environment and every inherited
	// descriptor (QEMU's and libvirt's fd=, clientfd=).
	if os.Getenv(leanSocketEnv) != "off" {
		if lean, ok := trustedSibling("cvtpm-swtpm"); ok {
			syscall.Exec(lean, append([]string{lean, "socket"}, args...), os.Environ())
			// Only an exec that failed returns: serve from here.
		}
	}
	swtpmsocket.TuneRuntime()
	err := swtpmsocket.Run(ctx, args)
	var e swtpmsocket.ExitError
	if errors.As(err, &e) {
		return exitError{int(e)}
	}
	return err
}
