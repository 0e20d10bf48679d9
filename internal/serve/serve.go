// Package serve holds what every cvtpm network service sets on its
// listeners and servers, so that a hostile client cannot hold more than
// its share: connection caps (netaddr.Limits), gRPC message sizes and
// keepalive enforcement, HTTP timeouts and body limits.
package serve

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"

	"cvtpm/internal/netaddr"
)

// Default connection caps of a public listener: 1024 at once, 64 from one
// address.
const (
	DefaultMaxConns     = 1024
	DefaultMaxPerSource = 64
)

// Listen wraps ln with the default caps (netaddr.Limits) under name.
func Listen(ln net.Listener, name string, log *slog.Logger) net.Listener {
	return (&netaddr.Limits{Max: DefaultMaxConns, MaxPerSource: DefaultMaxPerSource, Name: name, Log: log}).Listen(ln)
}

// GRPCOptions are a public gRPC server's options: messages up to maxRecv
// bytes (sized to its protocol), clients that ping more often than every
// 10 s cut off, idle connections closed after 5 minutes, at most 100
// concurrent streams per connection.
func GRPCOptions(maxRecv int) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxRecvMsgSize(maxRecv),
		grpc.MaxConcurrentStreams(100),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: 5 * time.Minute, Time: time.Minute, Timeout: 20 * time.Second}),
		grpc.ConnectionTimeout(10 * time.Second),
	}
}

// IdleTimeout is how long an HTTP connection may wait for its next
// request; ReadHeaderTimeout how long a new one may take to send its
// first request's headers.
var (
	IdleTimeout       = time.Minute
	ReadHeaderTimeout = 10 * time.Second
)

// HTTPServer is a public HTTP server for h: bodies up to maxBody bytes,
// request headers within ReadHeaderTimeout, a whole request within 30 s,
// a response within a minute, idle connections closed after IdleTimeout.
func HTTPServer(h http.Handler, maxBody int64) *http.Server {
	return &http.Server{Handler: http.MaxBytesHandler(h, maxBody),
		ReadHeaderTimeout: ReadHeaderTimeout, ReadTimeout: 30 * time.Second, WriteTimeout: time.Minute,
		IdleTimeout: IdleTimeout, MaxHeaderBytes: 64 << 10}
}

// PeerSource is the client address of a call as the limits count it (the
// gRPC peer's host, or what an HTTP handler put in the context the same
// way); "" in process.
func PeerSource(ctx context.Context) string {
	p, ok := peer.FromContext(ctx)
	if !ok || p.Addr == nil {
		return ""
	}
	if host, _, err := net.SplitHostPort(p.Addr.String()); err == nil {
		return host
	}
	return p.Addr.String()
}
