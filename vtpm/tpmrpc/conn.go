package tpmrpc

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"cvtpm/vtpm/swtpmproto"
)

// Messages on a plain stream (ServeConn, ConnCaller) are framed as a u32
// big-endian length followed by the message. This framing has no
// integrity protection: use it only on sockets both ends trust, such as a
// socketpair between the backend supervisor and its worker.

// ReadMessage reads one length-prefixed message into buf (grown as
// needed) and returns it.
func ReadMessage(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxMessage {
		return nil, fmt.Errorf("%w: message length %d exceeds %d", ErrMalformed, n, MaxMessage)
	}
	if cap(buf) < int(n) && n > 64<<10 {
		// A large length prefix is not trusted with an allocation of its
		// size up front: the bytes must arrive first.
		b, err := io.ReadAll(io.LimitReader(r, int64(n)))
		if err != nil {
			return nil, fmt.Errorf("message truncated: %w", err)
		}
		if len(b) < int(n) {
			return nil, fmt.Errorf("message truncated: %w", io.ErrUnexpectedEOF)
		}
		return b, nil
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("message truncated: %w", err)
	}
	return buf, nil
}

// appendFramed appends the length-prefixed msg to dst.
func appendFramed(dst, msg []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(msg)))
	return append(dst, msg...)
}

// deadliner is the part of net.Conn that a blocking *os.File lacks.
type deadliner interface {
	SetDeadline(time.Time) error
	SetReadDeadline(time.Time) error
}

// ServeConn answers requests on conn with tpm until conn fails or ctx
// ends. conn may be a net.Conn or a blocking *os.File: a worker serving
// one connection reads it with plain blocking reads, which wake faster
// than the netpoller; then only closing conn (or the process ending)
// stops it.
func ServeConn(ctx context.Context, conn io.ReadWriter, tpm swtpmproto.TPM) error {
	if d, ok := conn.(deadliner); ok {
		stop := context.AfterFunc(ctx, func() { d.SetReadDeadline(time.Now()) })
		defer stop()
	}
	var in, out []byte
	for {
		msg, err := ReadMessage(conn, in)
		if err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return nil
			}
			return err
		}
		in = msg[:0]
		// Reserve the length prefix, then patch it.
		out = append(out[:0], 0, 0, 0, 0)
		out = Handle(tpm, msg, out)
		binary.BigEndian.PutUint32(out, uint32(len(out)-4))
		if _, err := conn.Write(out); err != nil {
			return err
		}
	}
}

// ConnCaller is a Caller over a stream; calls are serialised.
type ConnCaller struct {
	mu   sync.Mutex
	conn io.ReadWriteCloser
	// deadlines is conn when it honours deadlines (a net.Conn); nil for a
	// blocking *os.File, whose SetDeadline always fails.
	deadlines deadliner
	out       []byte
	in        []byte
}

// NewConnCaller returns a Caller that sends requests on conn, a net.Conn
// or a blocking *os.File. Only a net.Conn honours the context's deadline;
// with a file, the owner bounds calls by other means (the backend kills a
// worker that does not answer in time).
func NewConnCaller(conn io.ReadWriteCloser) *ConnCaller {
	c := &ConnCaller{conn: conn}
	if d, ok := conn.(deadliner); ok && d.SetDeadline(time.Time{}) == nil {
		c.deadlines = d
	}
	return c
}

// Call implements Caller. On a timeout the connection is no longer usable
// (a late answer would be taken for the next call's), so it is closed.
func (c *ConnCaller) Call(ctx context.Context, req []byte) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d := c.deadlines; d != nil {
		if dl, ok := ctx.Deadline(); ok {
			d.SetDeadline(dl)
		}
		stop := context.AfterFunc(ctx, func() { d.SetDeadline(time.Now()) })
		defer stop()
	}
	c.out = appendFramed(c.out[:0], req)
	_, err := c.conn.Write(c.out)
	// Requests can carry secrets (state in the clear on a worker's socket,
	// NV data, imported keys): none stays in the buffer until the next call.
	clear(c.out)
	if err != nil {
		c.conn.Close()
		return nil, err
	}
	return c.reply()
}

// reply reads the answer to the request just sent; on failure the
// connection is closed (its framing is lost).
func (c *ConnCaller) reply() ([]byte, error) {
	msg, err := ReadMessage(c.conn, c.in)
	if err != nil {
		c.conn.Close()
		return nil, err
	}
	c.in = msg[:0]
	return msg, nil
}

// Close closes the connection.
func (c *ConnCaller) Close() error { return c.conn.Close() }
