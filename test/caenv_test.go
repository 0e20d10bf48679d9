package test

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"cvtpm/ca"
	"cvtpm/test/testenv"
)

// caProc is a running `cvtpm ca` on loopback (gRPC over TLS and HTTP).
type caProc struct {
	Dir, Addr, HTTPAddr string
	// Fingerprint is the SHA-256 of its service root, what clients pin.
	Fingerprint string
	*testenv.Daemon
}

// startCAProc runs `cvtpm ca --dir dir --policy policy args...` on free ports
// (args name the HSK+CEK source and anything else).
func startCAProc(tb testing.TB, dir, policy string, args ...string) *caProc {
	tb.Helper()
	c := &caProc{Dir: dir, Addr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb)), HTTPAddr: fmt.Sprintf("127.0.0.1:%d", testenv.FreePort(tb))}
	c.Daemon = testenv.StartDaemon(tb, "ca", []string{"tcp:" + c.Addr, "tcp:" + c.HTTPAddr}, append([]string{"ca", "--dir", dir, "--policy", policy,
		"--listen", c.Addr, "--http", c.HTTPAddr}, args...)...)
	c.Fingerprint = ca.Fingerprint(c.Root(tb, ca.PurposeService).Raw)
	return c
}

// Restart stops the CA and starts it again on the same ports.
func (c *caProc) Restart(tb testing.TB) {
	tb.Helper()
	c.Stop()
	c.Daemon = testenv.StartDaemon(tb, "ca", []string{"tcp:" + c.Addr, "tcp:" + c.HTTPAddr}, c.Cmd.Args[1:]...)
}

// RootFile is the PEM file of a purpose's root in the CA directory.
func (c *caProc) RootFile(p ca.Purpose) string {
	return filepath.Join(c.Dir, ca.RootFileName(p))
}

// Root reads a purpose's root certificate.
func (c *caProc) Root(tb testing.TB, p ca.Purpose) *x509.Certificate {
	tb.Helper()
	b, err := os.ReadFile(c.RootFile(p))
	if err != nil {
		tb.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		tb.Fatalf("%s: not PEM", c.RootFile(p))
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		tb.Fatal(err)
	}
	return cert
}

// CRLURL is the HTTP address of a purpose's CRL.
func (c *caProc) CRLURL(p ca.Purpose) string {
	if p == ca.PurposeEK {
		return "http://" + c.HTTPAddr + "/crl"
	}
	return "http://" + c.HTTPAddr + "/crl/" + string(p)
}

// ClientFlags are what cvtpm's clients need to reach it: --ca and
// --ca-fingerprint.
func (c *caProc) ClientFlags() []string {
	return []string{"--ca", c.Addr, "--ca-fingerprint", c.Fingerprint}
}

// Conn is a gRPC connection to its TLS port, pinned to its service root.
func (c *caProc) Conn(tb testing.TB) *grpc.ClientConn {
	tb.Helper()
	pin, err := ca.ParseFingerprint(c.Fingerprint)
	if err != nil {
		tb.Fatal(err)
	}
	conn, err := grpc.NewClient(c.Addr, grpc.WithTransportCredentials(credentials.NewTLS(ca.ClientTLS(pin))))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return conn
}
