// Package tpmsock is a go-tpm transport over a TPM server's data socket
// (swtpm's and cvtpm's --server): raw commands out, whole responses in.
package tpmsock

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
)

// maxResponse bounds a response (libtpms' largest is 4 KiB).
const maxResponse = 64 << 10

// Conn is a transport.TPMCloser on one kept-open connection.
type Conn struct {
	c   net.Conn
	buf []byte
}

var _ transport.TPMCloser = (*Conn)(nil)

// Dial connects to a data socket: network "unix" or "tcp".
func Dial(ctx context.Context, network, addr string) (*Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("connecting to the TPM at %s: %w", addr, err)
	}
	return &Conn{c: c}, nil
}

// New is a Conn on c, an open data connection (e.g. the socket a client
// passed with CMD_SET_DATAFD).
func New(c net.Conn) *Conn { return &Conn{c: c} }

// Send writes one command and reads its whole response.
func (t *Conn) Send(cmd []byte) ([]byte, error) {
	t.c.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := t.c.Write(cmd); err != nil {
		return nil, fmt.Errorf("sending a TPM command: %w", err)
	}
	hdr := make([]byte, 10)
	if _, err := io.ReadFull(t.c, hdr); err != nil {
		return nil, fmt.Errorf("reading a TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("TPM response claims %d bytes", size)
	}
	rsp := make([]byte, size)
	copy(rsp, hdr)
	if _, err := io.ReadFull(t.c, rsp[10:]); err != nil {
		return nil, fmt.Errorf("reading a TPM response: %w", err)
	}
	return rsp, nil
}

// Close closes the connection.
func (t *Conn) Close() error { return t.c.Close() }
