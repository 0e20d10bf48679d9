package main

// "cvtpm verifier" runs the verifier service, which lives in its own
// binary (bin/cvtpm-verifier, built beside bin/cvtpm): its policy engine
// would otherwise cost every vTPM process start-up time and memory.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

func init() {
	register(command{name: "verifier", summary: "the combined verifier: TPM quotes + CSV reports in, one signed EAR result out", run: runVerifier})
}

func runVerifier(_ context.Context, args []string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	path, ok := trustedSibling("cvtpm-verifier")
	if !ok {
		return errors.New("the verifier is the separate binary cvtpm-verifier, expected beside cvtpm at " + filepath.Join(filepath.Dir(exe), "cvtpm-verifier") +
			", executable, owned by root or by cvtpm's owner and writable by no one else ('make build' builds both)")
	}
	err = syscall.Exec(path, append([]string{path}, args...), os.Environ())
	return fmt.Errorf("running %s: %w", path, err)
}
