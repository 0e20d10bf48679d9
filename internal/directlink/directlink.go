// Package directlink is the record layer of a direct session: an attested
// link session (internal/attestedlink) that the backend's supervisor has
// handed, socket and all, to the worker of the one instance it serves, so
// that a guest's TPM commands reach libtpms without waking the supervisor.
//
// The TLS handshake, the CSV evidence and the authorisation stay in the
// supervisor; only the symmetric keys leave it. Both ends derive them from
// the attested TLS session's exporter (ExporterLabel, with the instance id
// as context), one key per direction, so the host that relays the bytes
// holds neither, and a key is good for that session and instance only.
//
// Record: length u32 big-endian | AEAD ciphertext of one vtpm/tpmrpc
// message. The nonce is the record's sequence number in its direction
// (implicit, 0, 1, 2, ...), the additional data the length: a record that
// is altered, replayed, reordered, dropped or moved to the other direction
// fails to open, and the session ends.
//
// This package is linked into the lean worker binary: it imports only the
// AEADs (internal/gcm).
package directlink

import (
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"cvtpm/internal/gcm"
)

// ExporterLabel is the TLS exporter label both ends derive the keys with.
const ExporterLabel = "EXPORTER-cvtpm-direct-session"

// MaxRecord bounds a record's ciphertext: a TPM command or response is a
// few KiB (libtpms' buffer is 4 KiB), plus the tpmrpc header and the tag.
const MaxRecord = 16 << 10

// lengthSize is the record header.
const lengthSize = 4

// maxRecords ends a session long before a sequence number could repeat.
const maxRecords = 1 << 62

// ErrRecord wraps every refusal of a record: the session must end.
var ErrRecord = errors.New("direct session record refused")

// Keys are one direct session's keys.
type Keys struct {
	// Cipher is gcm.AES256 or gcm.SM4.
	Cipher string
	// ClientToServer seals what the guest sends, ServerToClient what the
	// worker answers.
	ClientToServer, ServerToClient []byte
}

// Wipe overwrites the keys.
func (k *Keys) Wipe() {
	clear(k.ClientToServer)
	clear(k.ServerToClient)
}

// Exporter is tls.ConnectionState.ExportKeyingMaterial.
type Exporter func(label string, context []byte, length int) ([]byte, error)

// ExportKeys derives a session's keys for instance from its TLS exporter.
func ExportKeys(export Exporter, instance, cipherName string) (Keys, error) {
	n := gcm.KeySize(cipherName)
	if n == 0 {
		return Keys{}, fmt.Errorf("direct session cipher %q: want %s or %s", cipherName, gcm.AES256, gcm.SM4)
	}
	b, err := export(ExporterLabel, []byte(instance), 2*n)
	if err != nil {
		return Keys{}, fmt.Errorf("direct session keys: TLS exporter: %w", err)
	}
	return Keys{Cipher: cipherName, ClientToServer: b[:n:n], ServerToClient: b[n:]}, nil
}

// Sealer seals the records of one direction.
type Sealer struct {
	aead cipher.AEAD
	seq  uint64
}

// Opener opens the records of one direction, in order.
type Opener struct {
	aead cipher.AEAD
	seq  uint64
}

// NewSealer returns the sealer for key (one direction of Keys).
func NewSealer(cipherName string, key []byte) (*Sealer, error) {
	a, err := gcm.New(cipherName, key)
	if err != nil {
		return nil, fmt.Errorf("direct session: %w", err)
	}
	return &Sealer{aead: a}, nil
}

// NewOpener returns the opener for key (one direction of Keys).
func NewOpener(cipherName string, key []byte) (*Opener, error) {
	a, err := gcm.New(cipherName, key)
	if err != nil {
		return nil, fmt.Errorf("direct session: %w", err)
	}
	return &Opener{aead: a}, nil
}

func nonce(seq uint64) []byte {
	var n [12]byte
	binary.BigEndian.PutUint64(n[4:], seq)
	return n[:]
}

// Seal appends the record carrying msg to dst.
func (s *Sealer) Seal(dst, msg []byte) ([]byte, error) {
	n := len(msg) + s.aead.Overhead()
	if n > MaxRecord {
		return dst, fmt.Errorf("%w: a message of %d bytes exceeds the record limit %d", ErrRecord, len(msg), MaxRecord-s.aead.Overhead())
	}
	if s.seq >= maxRecords {
		return dst, fmt.Errorf("%w: the session's sequence numbers are used up", ErrRecord)
	}
	start := len(dst)
	dst = binary.BigEndian.AppendUint32(dst, uint32(n))
	dst = s.aead.Seal(dst, nonce(s.seq), msg, dst[start:start+lengthSize])
	s.seq++
	return dst, nil
}

// ErrEnded is the worker's word, sealed, that it ended the session: the
// command the client sent last, if any, was not run and may be sent again
// on a new session. The host cannot forge it (it is a record of the
// session), only drop it, which leaves the client unsure, as any dropped
// connection does.
var ErrEnded = errors.New("the worker ended the direct session before running the command")

// AppendEnd appends the record that ends the session (an empty message;
// every tpmrpc message has a header).
func AppendEnd(s *Sealer, dst []byte) ([]byte, error) { return s.Seal(dst, nil) }

// Split returns the first whole record in buf (header included) and
// what follows it; ok is false while the record has not fully arrived.
// A length no record may have is an error at once, before its bytes come.
func Split(buf []byte) (record, rest []byte, ok bool, err error) {
	if len(buf) < lengthSize {
		return nil, buf, false, nil
	}
	n := binary.BigEndian.Uint32(buf)
	if n < 16 || n > MaxRecord {
		return nil, buf, false, fmt.Errorf("%w: record length %d (16..%d)", ErrRecord, n, MaxRecord)
	}
	end := lengthSize + int(n)
	if len(buf) < end {
		return nil, buf, false, nil
	}
	return buf[:end], buf[end:], true, nil
}

// Open opens record (as Split returns it) in place and returns the
// message, which aliases record. The record AppendEnd makes opens to
// ErrEnded.
func (o *Opener) Open(record []byte) ([]byte, error) {
	if len(record) < lengthSize || int(binary.BigEndian.Uint32(record)) != len(record)-lengthSize {
		return nil, fmt.Errorf("%w: malformed record", ErrRecord)
	}
	if o.seq >= maxRecords {
		return nil, fmt.Errorf("%w: the session's sequence numbers are used up", ErrRecord)
	}
	msg, err := o.aead.Open(record[lengthSize:lengthSize], nonce(o.seq), record[lengthSize:], record[:lengthSize])
	if err != nil {
		return nil, fmt.Errorf("%w: record %d does not authenticate (altered, replayed, reordered or not of this session)", ErrRecord, o.seq)
	}
	o.seq++
	if len(msg) == 0 {
		return nil, ErrEnded
	}
	return msg, nil
}

// ReadRecord reads one record from r into buf (grown as needed) and
// returns it for Open.
func ReadRecord(r io.Reader, buf []byte) ([]byte, error) {
	buf = append(buf[:0], 0, 0, 0, 0)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, err
	}
	if _, _, _, err := Split(buf); err != nil {
		return nil, err
	}
	n := lengthSize + int(binary.BigEndian.Uint32(buf))
	if cap(buf) < n {
		buf = append(make([]byte, 0, n), buf...)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf[lengthSize:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("%w: record truncated: %v", ErrRecord, err)
	}
	return buf, nil
}
