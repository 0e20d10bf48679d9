// Package netaddr turns the address strings of cvtpm's command lines into
// listeners and connections: "unix:/path", "tcp:host:port" (or a bare
// "host:port") and "vsock:port" (listen) / "vsock:cid:port" (dial). vsock is the transport
// between a workload VM and its host; it is kept a thin, separately named
// case so that tests can run everything else over unix and TCP sockets.
package netaddr

import (
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/mdlayher/vsock"
)

func split(addr string) (scheme, rest string, err error) {
	scheme, rest, ok := strings.Cut(addr, ":")
	switch {
	case ok && rest != "" && (scheme == "unix" || scheme == "tcp" || scheme == "vsock"):
		return scheme, rest, nil
	case isHostPort(addr):
		return "tcp", addr, nil // a bare HOST:PORT is TCP, everywhere
	}
	return "", "", fmt.Errorf("address %q: want unix:PATH, tcp:HOST:PORT (or HOST:PORT) or vsock:[CID:]PORT", addr)
}

func isHostPort(addr string) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	_, err = strconv.ParseUint(port, 10, 16)
	return err == nil
}

// Check reports whether addr is in the one address syntax every cvtpm
// flag takes (unix:PATH, tcp:HOST:PORT, HOST:PORT, vsock:[CID:]PORT),
// so a command can refuse a bad one before it starts.
func Check(addr string) error {
	_, _, err := split(addr)
	return err
}

// GRPCTarget is addr as gRPC's dialer names it: "tcp:H:P" and "H:P" are
// "H:P", "unix:PATH" stays; vsock has no gRPC resolver.
func GRPCTarget(addr string) (string, error) {
	scheme, rest, err := split(addr)
	if err != nil {
		return "", err
	}
	switch scheme {
	case "tcp":
		return rest, nil
	case "unix":
		return "unix:" + rest, nil
	}
	return "", fmt.Errorf("address %q: gRPC services are reached over tcp or unix", addr)
}

// Listen listens on addr. A unix socket left over from a previous run is
// replaced, and the new one is made accessible to its owner only.
func Listen(addr string) (net.Listener, error) {
	scheme, rest, err := split(addr)
	if err != nil {
		return nil, err
	}
	switch scheme {
	case "unix":
		if fi, err := os.Lstat(rest); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(rest)
		}
		ln, err := net.Listen("unix", rest)
		if err != nil {
			return nil, err
		}
		if err := os.Chmod(rest, 0o600); err != nil {
			ln.Close()
			return nil, err
		}
		return ln, nil
	case "tcp":
		return net.Listen("tcp", rest)
	case "vsock":
		port, err := strconv.ParseUint(rest, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("address %q: vsock port: %w", addr, err)
		}
		return vsock.Listen(uint32(port), nil)
	}
	return nil, fmt.Errorf("address %q: unknown scheme %q (unix, tcp or vsock)", addr, scheme)
}

// Dial connects to addr.
func Dial(ctx context.Context, addr string) (net.Conn, error) {
	scheme, rest, err := split(addr)
	if err != nil {
		return nil, err
	}
	switch scheme {
	case "unix", "tcp":
		var d net.Dialer
		return d.DialContext(ctx, scheme, rest)
	case "vsock":
		c, p, ok := strings.Cut(rest, ":")
		cid, err1 := strconv.ParseUint(c, 10, 32)
		port, err2 := strconv.ParseUint(p, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("address %q: want vsock:CID:PORT", addr)
		}
		return vsock.Dial(uint32(cid), uint32(port), nil)
	}
	return nil, fmt.Errorf("address %q: unknown scheme %q (unix, tcp or vsock)", addr, scheme)
}
