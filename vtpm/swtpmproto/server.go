// Package swtpmproto serves a TPM over swtpm's wire protocols: the control
// channel (include/swtpm/tpm_ioctl.h, including SET_DATAFD with SCM_RIGHTS),
// the data channel (raw TPM commands or the TPM_SEND_COMMAND prefix) and the
// Microsoft simulator ("mssim") command and platform ports, over unix sockets
// and TCP.
//
// Each connection is served on its own goroutine, which calls the TPM
// directly: no per-command hand-off, and per-connection buffers are reused.
// A data connection's first command is answered on the accepting goroutine
// (inline.go), so a client that opens a connection per command, as
// tpm2-tss's swtpm TCTI does, costs no goroutine at all. When the TPM is
// the local engine, the data listener's accept loop with each connection's
// first command (ListenerServer), and every connection that keeps talking
// (Streamer), run in the engine's C code instead, outside the Go scheduler
// (stream.go; engine/stream.go says why); a remote TPM is served in Go.
package swtpmproto

import (
	"context"
	"cvtpm/internal/netaddr"
	"cvtpm/vtpm/swtpmblob"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
)

// TPM is what the servers need from a TPM. *engine.TPM satisfies it; a
// frontend may satisfy it by forwarding to a remote engine. Methods return
// swtpm's TPM result codes.
type TPM interface {
	Init(flags uint32) uint32
	Stop()
	Running() bool
	Execute(dst, cmd []byte) []byte
	ExecuteAt(dst, cmd []byte, locality uint8) []byte
	SetLocality(loc uint8) uint32
	Established() (bool, uint32)
	ResetEstablished(loc uint8) uint32
	HashStart() uint32
	HashData(data []byte) uint32
	HashEnd() uint32
	Cancel() uint32
	StoreVolatile() uint32
	SetBufferSize(wanted uint32) (size, minSize, maxSize uint32, err error)
	Info(flags uint64) (string, error)
	GetState(blobType uint32) ([]byte, uint32)
	SetState(blobType uint32, blob []byte) uint32
	MaxCommandSize() int
}

// Options configures a Server.
type Options struct {
	Logger *slog.Logger
	// LockStorage serves CMD_LOCK_STORAGE; nil answers TPM_FAIL.
	LockStorage func(retries uint32) error
	// FileKey and MigrationKey are reported by CMD_GET_CONFIG.
	FileKey, MigrationKey bool
	// Migration seals and opens state blobs for GET/SET_STATEBLOB when a
	// migration key is set; nil transfers them in the clear.
	Migration BlobSealer
	// TerminateOnDisconnect requests shutdown when a data connection ends
	// (swtpm's --terminate).
	TerminateOnDisconnect bool
	// RejectLocality4 refuses locality 4 (swtpm's --locality reject-locality-4).
	RejectLocality4 bool
	// NoStreamLoop serves every data connection command by command in Go,
	// even when the TPM is a Streamer (for tests and comparisons).
	NoStreamLoop bool
}

// BlobSealer encrypts state blobs in transit (the --migration-key).
type BlobSealer = swtpmblob.Sealer

// Server serves one TPM on any number of listeners.
type Server struct {
	tpm  TPM
	opts Options
	log  *slog.Logger

	mu         sync.Mutex
	dataFD     net.Conn // the connection passed by CMD_SET_DATAFD, if any
	dataCancel context.CancelFunc
	shutdown   chan struct{}
	once       sync.Once
	conns      sync.WaitGroup

	handOffs      atomic.Uint64 // data connections moved off the accepting goroutine (inline.go)
	streams       atomic.Int32  // connections the Streamer serves now (stream.go)
	streamsServed atomic.Uint64 // connections handed to the Streamer
	buffers       sync.Pool     // *connBuffers
	maxCmdOnce    sync.Once
	maxCmd        int
}

// New returns a Server for tpm.
func New(tpm TPM, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{tpm: tpm, opts: opts, log: opts.Logger, shutdown: make(chan struct{})}
	s.buffers.New = newConnBuffers
	return s
}

// ShutdownRequested is closed when a client sent CMD_SHUTDOWN; swtpm then
// terminates, and so should the caller.
func (s *Server) ShutdownRequested() <-chan struct{} { return s.shutdown }

func (s *Server) requestShutdown() { s.once.Do(func() { close(s.shutdown) }) }

// serve accepts connections on ln until ctx ends or ln fails, running handle
// for each on its own goroutine.
func (s *Server) serve(ctx context.Context, ln net.Listener, handle func(context.Context, net.Conn)) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := netaddr.Accept(ln, s.log)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		s.conns.Add(1)
		go func() {
			defer s.conns.Done()
			defer c.Close()
			cctx, cancel := context.WithCancel(ctx)
			defer cancel()
			unblock := context.AfterFunc(cctx, func() { c.Close() })
			defer unblock()
			handle(cctx, c)
		}()
	}
}

// Wait waits for all connection goroutines to end (the engine's C accept
// loop ends with ServeData, and runs no command after the stop).
func (s *Server) Wait() { s.conns.Wait() }
