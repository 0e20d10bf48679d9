package bench

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"

	"github.com/google/go-tpm/tpm2/transport"
)

// maxResponse bounds a response size read from the header, so a broken server
// produces an error instead of a huge allocation.
const maxResponse = 64 << 10

// streamTPM is a transport.TPM over one kept-open stream connection: the raw
// TPM command goes out, the response is read by its header's size field.
type streamTPM struct {
	conn net.Conn
	buf  []byte
}

var _ transport.TPM = (*streamTPM)(nil)

func dialTPM(nw network, addr string) (*streamTPM, error) {
	c, err := net.Dial(string(nw), addr)
	if err != nil {
		return nil, fmt.Errorf("dial TPM at %s %s: %w", nw, addr, err)
	}
	return &streamTPM{conn: c, buf: make([]byte, 4096)}, nil
}

func (t *streamTPM) Send(cmd []byte) ([]byte, error) {
	if _, err := t.conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("write TPM command: %w", err)
	}
	return readResponse(t.conn, t.buf)
}

func (t *streamTPM) Close() error { return t.conn.Close() }

// readResponse reads one TPM response (10-byte header, then the rest as told
// by the header's size) into buf when it fits.
func readResponse(r io.Reader, buf []byte) ([]byte, error) {
	var hdr [10]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, fmt.Errorf("read TPM response header: %w", err)
	}
	size := binary.BigEndian.Uint32(hdr[2:6])
	if size < 10 || size > maxResponse {
		return nil, fmt.Errorf("TPM response size %d outside [10, %d]", size, maxResponse)
	}
	if int(size) > cap(buf) {
		buf = make([]byte, size)
	}
	rsp := buf[:size]
	copy(rsp, hdr[:])
	if _, err := io.ReadFull(r, rsp[10:]); err != nil {
		return nil, fmt.Errorf("read TPM response body (%d bytes): %w", size-10, err)
	}
	return rsp, nil
}

// connPerCommandTPM follows tpm2-tss's swtpm TCTI: a new connection for
// every command, closed after the response.
type connPerCommandTPM struct {
	network network
	addr    string
	buf     []byte
}

func (t *connPerCommandTPM) Send(cmd []byte) ([]byte, error) {
	c, err := dialTPM(t.network, t.addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if t.buf == nil {
		t.buf = make([]byte, 4096)
	}
	c.buf = t.buf
	return c.Send(cmd)
}
