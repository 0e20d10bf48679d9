// Package obs is what an operator sees of a cvtpm daemon: its log (level
// and format chosen on the command line), its health (/healthz, /readyz,
// and the standard gRPC health service) and its Prometheus metrics
// (/metrics). Counters live in the packages that count (ca, verifier,
// backend), registered with Prometheus' default registry; this package
// only serves them.
package obs

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"cvtpm/internal/serve"
)

// LogFlags are a daemon's --log-level and --log-format.
type LogFlags struct {
	level, format *string
}

// AddLogFlags registers --log-level and --log-format on fs.
func AddLogFlags(fs *flag.FlagSet) LogFlags {
	return LogFlags{
		level:  fs.String("log-level", "info", "log level: debug, info, warn or error"),
		format: fs.String("log-format", "text", "log format: text (key=value) or json (one object per line)"),
	}
}

// Logger is the daemon's logger on w, as the flags ask.
func (f LogFlags) Logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(*f.level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", *f.level)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch strings.ToLower(*f.format) {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", *f.format)
}

// Handler serves /metrics (Prometheus' default registry), /healthz (the
// process answers) and /readyz (ready reports nil: it can do its job).
func Handler(ready func(context.Context) error) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.Handler())
	AddHealth(mux, ready)
	return mux
}

// AddHealth adds /healthz and /readyz to mux.
func AddHealth(mux *http.ServeMux, ready func(context.Context) error) {
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if ready != nil {
			ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
			defer cancel()
			if err := ready(ctx); err != nil {
				http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
}

// Serve runs the metrics and health endpoints on addr ("host:port") until
// ctx ends; it returns the bound address at once.
func Serve(ctx context.Context, addr string, ready func(context.Context) error, log *slog.Logger) (string, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", fmt.Errorf("--metrics: %w", err)
	}
	srv := &http.Server{Handler: Handler(ready), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		WriteTimeout: time.Minute, IdleTimeout: time.Minute}
	go func() {
		if err := srv.Serve(serve.Listen(ln, "metrics", log)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint failed", "err", err)
		}
	}()
	context.AfterFunc(ctx, func() { srv.Close() })
	return ln.Addr().String(), nil
}

// RegisterHealth adds the standard gRPC health service to g, reporting
// SERVING for the whole server and for each named service.
func RegisterHealth(g *grpc.Server, services ...string) *health.Server {
	h := health.NewServer()
	h.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	for _, s := range services {
		h.SetServingStatus(s, healthpb.HealthCheckResponse_SERVING)
	}
	healthpb.RegisterHealthServer(g, h)
	return h
}

// OnHangup calls reload whenever the process receives SIGHUP, until ctx
// ends: configuration files are read again; one that does not load is
// refused (logged) and what is in force stays.
func OnHangup(ctx context.Context, log *slog.Logger, what string, reload func() error) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGHUP)
	go func() {
		defer signal.Stop(c)
		for {
			select {
			case <-ctx.Done():
				return
			case <-c:
				if err := reload(); err != nil {
					log.Error("SIGHUP: reload refused; the configuration in force stays", "what", what, "err", err)
				} else {
					log.Info("SIGHUP: reloaded", "what", what)
				}
			}
		}
	}()
}

// NotifyReady tells systemd (Type=notify units) that the daemon serves:
// "READY=1" on $NOTIFY_SOCKET, if set. Without systemd it does nothing.
func NotifyReady() error {
	addr := os.Getenv("NOTIFY_SOCKET")
	if addr == "" {
		return nil
	}
	if strings.HasPrefix(addr, "@") {
		addr = "\x00" + addr[1:] // abstract namespace
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notifying systemd: %w", err)
	}
	defer c.Close()
	_, err = c.Write([]byte("READY=1"))
	return err
}
