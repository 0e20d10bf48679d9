// Command cvtpm-swtpm is cvtpm's drop-in for swtpm alone: "cvtpm-swtpm
// socket --tpm2 ..." is "cvtpm socket" (vtpm/swtpmsocket) in a binary that
// links only the TPM engine, the sealed state store and the swtpm
// protocol, none of the backend's, CA's or verifier's code, so that it
// starts and idles like swtpm. Link it as "swtpm" for libvirt and
// swtpm_setup.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"cvtpm/internal/version"
	"cvtpm/vtpm/swtpmsocket"
)

func main() {
	swtpmsocket.TuneRuntime()
	args := os.Args[1:]
	if len(args) == 1 && (args[0] == "--version" || args[0] == "version") {
		fmt.Println(version.String("cvtpm-swtpm"))
		return
	}
	if len(args) == 0 || args[0] != "socket" {
		fmt.Fprintln(os.Stderr, "usage: cvtpm-swtpm socket --tpm2 [swtpm socket options] (see 'cvtpm-swtpm socket --help')")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := swtpmsocket.Run(ctx, args[1:])
	stop()
	var e swtpmsocket.ExitError
	switch {
	case errors.As(err, &e):
		os.Exit(int(e))
	case err != nil:
		fmt.Fprintf(os.Stderr, "cvtpm socket: %v\n", err)
		os.Exit(1)
	}
}
