package main

// gRPC connections of the command-line clients.

import (
	"fmt"
	"path/filepath"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// dialGRPC connects to a cvtpm service's public API (host:port). These
// APIs carry only public or signed data (enrollment, AK certification,
// evidence), so the channel is plaintext; what matters is checked in the
// payloads.
func dialGRPC(flagName, addr string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", flagName, addr, err)
	}
	return conn, nil
}

// dialUnix connects to an admin socket; its 0600 mode is the access check.
func dialUnix(path string) (*grpc.ClientConn, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	return grpc.NewClient("unix://"+abs, grpc.WithTransportCredentials(insecure.NewCredentials()))
}
