package tpmrpc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Caller sends one encoded request and returns the encoded response. The
// response may alias a buffer the Caller reuses on its next call.
type Caller interface {
	Call(ctx context.Context, req []byte) ([]byte, error)
}

// Client is a swtpmproto.TPM whose calls are performed by a Caller, so a
// protocol server (swtpmproto.Server) can serve a TPM that lives elsewhere.
// swtpmproto.TPM has no error returns for most calls: a failed call is
// logged, answered as swtpm answers a failing TPM (TPM_FAIL, or a TPM
// TPM_RC_FAILURE response for a command), and remembered for Err.
type Client struct {
	caller  Caller
	timeout time.Duration
	log     *slog.Logger

	mu      sync.Mutex
	buf     []byte
	lastErr error
	maxCmd  int
}

// ClientOptions configure a Client.
type ClientOptions struct {
	// Timeout bounds one call; zero means 2 minutes (RSA key generation in
	// a TPM takes seconds).
	Timeout time.Duration
	Logger  *slog.Logger
}

// NewClient returns a Client over caller.
func NewClient(caller Caller, opts ClientOptions) *Client {
	if opts.Timeout == 0 {
		opts.Timeout = 2 * time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Client{caller: caller, timeout: opts.Timeout, log: opts.Logger}
}

// swtpm result codes used for failed calls.
const (
	rcFail = 0x09 // TPM_FAIL
)

// Err returns the last call's transport error, if any.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

// do performs r; on success resp.Payload aliases the caller's buffer and is
// valid until the next call (callers copy under c.mu via the helpers).
func (c *Client) do(r Request, use func(Response)) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	c.buf = AppendRequest(c.buf[:0], r)
	out, err := c.caller.Call(ctx, c.buf)
	if err == nil {
		var resp Response
		if resp, err = ParseResponse(out); err == nil {
			if resp.Err != "" {
				err = &RemoteError{Op: r.Op, Msg: resp.Err}
			} else {
				use(resp)
			}
		}
	}
	if err != nil {
		var re *RemoteError
		if !errors.As(err, &re) {
			err = fmt.Errorf("tpmrpc %v: %w", r.Op, err)
		}
		c.lastErr = err
		c.log.Warn("remote TPM call failed", "op", r.Op.String(), "err", err)
	} else {
		c.lastErr = nil
	}
	return err
}

// RemoteError is an error the remote side returned for a call.
type RemoteError struct {
	Op  Op
	Msg string
}

func (e *RemoteError) Error() string { return fmt.Sprintf("remote TPM %v: %s", e.Op, e.Msg) }

func (c *Client) rc(r Request) uint32 {
	var rc uint32 = rcFail
	c.do(r, func(resp Response) { rc = resp.RC })
	return rc
}

// Init implements swtpmproto.TPM.
func (c *Client) Init(flags uint32) uint32 { return c.rc(Request{Op: OpInit, Arg: uint64(flags)}) }

// Stop implements swtpmproto.TPM.
func (c *Client) Stop() { c.do(Request{Op: OpStop}, func(Response) {}) }

// Running implements swtpmproto.TPM.
func (c *Client) Running() bool {
	running := false
	c.do(Request{Op: OpRunning}, func(resp Response) { running = resp.V[0] != 0 })
	return running
}

// Execute implements swtpmproto.TPM.
func (c *Client) Execute(dst, cmd []byte) []byte {
	return c.execute(dst, Request{Op: OpExecute, Payload: cmd})
}

// ExecuteAt implements swtpmproto.TPM.
func (c *Client) ExecuteAt(dst, cmd []byte, locality uint8) []byte {
	return c.execute(dst, Request{Op: OpExecute, Locality: locality, Arg: ExecuteAtLocality, Payload: cmd})
}

func (c *Client) execute(dst []byte, r Request) []byte {
	ok := false
	err := c.do(r, func(resp Response) {
		if len(resp.Payload) >= 10 {
			dst, ok = append(dst, resp.Payload...), true
		}
	})
	if !ok {
		if err == nil {
			c.log.Warn("remote TPM returned a response shorter than a TPM header")
		}
		dst = append(dst, 0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01) // TPM_ST_NO_SESSIONS, TPM_RC_FAILURE
	}
	return dst
}

// SetLocality implements swtpmproto.TPM.
func (c *Client) SetLocality(loc uint8) uint32 {
	return c.rc(Request{Op: OpSetLocality, Locality: loc})
}

// Established implements swtpmproto.TPM.
func (c *Client) Established() (bool, uint32) {
	var est bool
	var rc uint32 = rcFail
	c.do(Request{Op: OpEstablished}, func(resp Response) { est, rc = resp.V[0] != 0, resp.RC })
	return est, rc
}

// ResetEstablished implements swtpmproto.TPM.
func (c *Client) ResetEstablished(loc uint8) uint32 {
	return c.rc(Request{Op: OpResetEstablished, Locality: loc})
}

// HashStart implements swtpmproto.TPM.
func (c *Client) HashStart() uint32 { return c.rc(Request{Op: OpHashStart}) }

// HashData implements swtpmproto.TPM.
func (c *Client) HashData(data []byte) uint32 {
	return c.rc(Request{Op: OpHashData, Payload: data})
}

// HashEnd implements swtpmproto.TPM.
func (c *Client) HashEnd() uint32 { return c.rc(Request{Op: OpHashEnd}) }

// Cancel implements swtpmproto.TPM. Calls are serialised, so a cancel
// reaches the TPM after the command it meant to cancel; libtpms ignores
// cancellation anyway.
func (c *Client) Cancel() uint32 { return c.rc(Request{Op: OpCancel}) }

// StoreVolatile implements swtpmproto.TPM.
func (c *Client) StoreVolatile() uint32 { return c.rc(Request{Op: OpStoreVolatile}) }

// SetBufferSize implements swtpmproto.TPM.
func (c *Client) SetBufferSize(wanted uint32) (size, minSize, maxSize uint32, err error) {
	err = c.do(Request{Op: OpSetBufferSize, Arg: uint64(wanted)}, func(resp Response) {
		size, minSize, maxSize = resp.V[0], resp.V[1], resp.V[2]
	})
	return
}

// Info implements swtpmproto.TPM.
func (c *Client) Info(flags uint64) (string, error) {
	var s string
	err := c.do(Request{Op: OpInfo, Arg: flags}, func(resp Response) { s = string(resp.Payload) })
	return s, err
}

// GetState implements swtpmproto.TPM.
func (c *Client) GetState(blobType uint32) ([]byte, uint32) {
	var blob []byte
	var rc uint32 = rcFail
	c.do(Request{Op: OpGetState, Arg: uint64(blobType)}, func(resp Response) {
		blob, rc = append([]byte(nil), resp.Payload...), resp.RC
	})
	return blob, rc
}

// SetState implements swtpmproto.TPM.
func (c *Client) SetState(blobType uint32, blob []byte) uint32 {
	return c.rc(Request{Op: OpSetState, Arg: uint64(blobType), Payload: blob})
}

// LockHost closes the host path of an instance bound to this workload with
// host "boot", until the next reset.
func (c *Client) LockHost() error { return c.do(Request{Op: OpLockHost}, func(Response) {}) }

// MaxCommandSize implements swtpmproto.TPM. The answer is cached: it is a
// property of the TPM build.
func (c *Client) MaxCommandSize() int {
	c.mu.Lock()
	n := c.maxCmd
	c.mu.Unlock()
	if n > 0 {
		return n
	}
	n = 4096
	c.do(Request{Op: OpMaxCommandSize}, func(resp Response) {
		if resp.V[0] > 0 {
			n = int(resp.V[0])
		}
	})
	c.mu.Lock()
	c.maxCmd = n
	c.mu.Unlock()
	return n
}

// Send executes one TPM command and returns its response, so a Client is a
// go-tpm transport.TPM. Unlike Execute it reports a failed call as an error.
func (c *Client) Send(cmd []byte) ([]byte, error) {
	var resp []byte
	err := c.do(Request{Op: OpExecute, Payload: cmd}, func(r Response) { resp = append([]byte(nil), r.Payload...) })
	if err != nil {
		return nil, err
	}
	if len(resp) < 10 {
		return nil, fmt.Errorf("remote TPM returned %d bytes, shorter than a response header", len(resp))
	}
	return resp, nil
}
