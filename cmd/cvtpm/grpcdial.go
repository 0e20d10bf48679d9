package main

// gRPC connections of the command-line clients.

import (
	"fmt"
	"os"
	"path/filepath"

	"cvtpm/ca"
	"cvtpm/internal/netaddr"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// dialGRPC connects to the verifier's public API (host:port). It carries
// only evidence and signed results, so the channel is plaintext; what
// matters is checked in the payloads. The CA is dialled with dialCA.
func dialGRPC(flagName, addr string) (*grpc.ClientConn, error) {
	target, err := netaddr.GRPCTarget(addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", flagName, addr, err)
	}
	return conn, nil
}

// dialUnix connects to an admin socket; its 0600 mode is the access check.
// flagName is the flag that named it (or its directory), for the error
// when no daemon listens there.
func dialUnix(flagName, path string) (*grpc.ClientConn, error) {
	if st, err := os.Stat(path); err != nil || st.Mode()&os.ModeSocket == 0 {
		return nil, fmt.Errorf("%s: no daemon's admin socket at %s: is it running with this setting?", flagName, path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	return grpc.NewClient("unix://"+abs, grpc.WithTransportCredentials(insecure.NewCredentials()))
}

// caFingerprintHelp is the --ca-fingerprint flag's usage.
const caFingerprintHelp = "SHA-256 of the CA's service root (printed by 'cvtpm ca' at start and by 'cvtpm ca fingerprint --dir DIR'): the CA's TLS port must present it"

// dialCA connects to the CA's gRPC port over TLS, trusting only a CA whose
// service root has the pinned fingerprint: a relay in between can neither
// read nor change the roots, CRLs and certificates that come back.
func dialCA(flagName, addr, fingerprint string) (*grpc.ClientConn, error) {
	if fingerprint == "" {
		return nil, fmt.Errorf("%s %s: --ca-fingerprint is required: the SHA-256 of the CA's service root ('cvtpm ca fingerprint --dir DIR' prints it)", flagName, addr)
	}
	pin, err := ca.ParseFingerprint(fingerprint)
	if err != nil {
		return nil, fmt.Errorf("--ca-fingerprint: %w", err)
	}
	target, err := netaddr.GRPCTarget(addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flagName, err)
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(credentials.NewTLS(ca.ClientTLS(pin))))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", flagName, addr, err)
	}
	return conn, nil
}
