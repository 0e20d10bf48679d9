package statestore

import (
	"bytes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"

	"cvtpm/internal/gcm"
)

type cipherID uint16

const (
	cipherNone      cipherID = 0
	cipherAES256GCM cipherID = 1
	cipherSM4GCM    cipherID = 2
)

var cipherNames = map[cipherID]string{
	cipherNone:      "none",
	cipherAES256GCM: "aes-256-gcm",
	cipherSM4GCM:    "sm4-gcm",
}

// PasswordSalt and PasswordIterations define the password KDF
// (PBKDF2-HMAC-SHA256). The salt is fixed so that the same password always
// opens the same directory without storing anything beside it.
const (
	PasswordSalt       = "cvtpm statestore password v1"
	PasswordIterations = 100_000
)

// Key is the master key that seals a state directory, with its cipher.
// Per-blob AEAD keys are derived from it with HKDF-SHA256, binding the blob
// name. A Key never prints its bytes.
type Key struct {
	cipher cipherID
	master []byte
	id     [8]byte
	// NoteMappedMode records that a swtpm CBC mode was mapped to GCM, so
	// the caller can tell the operator.
	NoteMappedMode string

	mu    sync.Mutex
	aeads map[uint16]cipher.AEAD // per blob id, derived once (aeadFor)
}

// String and LogValue keep key material out of logs and error messages.
func (k *Key) String() string             { return "statestore.Key{" + k.Cipher() + ", redacted}" }
func (k *Key) LogValue() slog.Value       { return slog.StringValue(k.String()) }
func (k *Key) GoString() string           { return k.String() }
func (k *Key) Format(f fmt.State, _ rune) { io.WriteString(f, k.String()) }

// Cipher names the AEAD: "aes-256-gcm" or "sm4-gcm".
func (k *Key) Cipher() string { return cipherNames[k.cipher] }

// NewKey makes a Key from raw key bytes (16, 32 or 64 bytes) for mode
// "aes-256-gcm" (default when empty) or "sm4-gcm". swtpm's "aes-cbc",
// "aes-128-cbc" and "aes-256-cbc" map to AES-256-GCM.
func NewKey(raw []byte, mode string) (*Key, error) {
	k := &Key{}
	switch strings.ToLower(mode) {
	case "", "aes-256-gcm":
		k.cipher = cipherAES256GCM
	case "sm4-gcm":
		k.cipher = cipherSM4GCM
	case "aes-cbc", "aes-128-cbc", "aes-256-cbc":
		k.cipher = cipherAES256GCM
		k.NoteMappedMode = mode
	default:
		return nil, fmt.Errorf("key mode %q: want aes-256-gcm or sm4-gcm", mode)
	}
	switch len(raw) {
	case 16, 32, 64:
	default:
		return nil, fmt.Errorf("key is %d bytes: want 16, 32 or 64", len(raw))
	}
	k.master = bytes.Clone(raw)
	mac := hmac.New(sha256.New, k.master)
	mac.Write([]byte("cvtpm key id"))
	copy(k.id[:], mac.Sum(nil))
	return k, nil
}

// aeadFor returns the AEAD for one blob id, derived once per Key: a
// worker seals its state at every write to the TPM's NV, and deriving the
// key and building the cipher each time was most of the garbage an
// instance's worker made (it holds the master key anyway). There are a
// handful of blob ids, so the cache stays small.
func (k *Key) aeadFor(blobID uint16) (cipher.AEAD, error) {
	// Only the ids this package seals with are kept: open derives the
	// AEAD for the id in a header before it is authenticated, and a forger
	// must not grow the cache by inventing ids.
	cache := blobID == migrationBlobID || storeBlobID(blobID)
	k.mu.Lock()
	defer k.mu.Unlock()
	if a, ok := k.aeads[blobID]; ok {
		return a, nil
	}
	name := cipherNames[k.cipher]
	info := fmt.Sprintf("cvtpm statestore v1 %s blob %d", name, blobID)
	sub, err := hkdf.Key(sha256.New, k.master, nil, info, gcm.KeySize(name))
	if err != nil {
		return nil, fmt.Errorf("deriving the blob key: %w", err)
	}
	a, err := gcm.New(name, sub)
	if err != nil {
		return nil, err
	}
	if !cache {
		return a, nil
	}
	if k.aeads == nil {
		k.aeads = map[uint16]cipher.AEAD{}
	}
	k.aeads[blobID] = a
	return a, nil
}

// KeyFromBytes decodes key file contents in swtpm's formats: "hex" (the
// default; surrounding whitespace ignored) or "binary".
func KeyFromBytes(b []byte, format, mode string) (*Key, error) {
	var raw []byte
	switch format {
	case "", "hex":
		s := strings.TrimSpace(string(b))
		var err error
		if raw, err = hex.DecodeString(s); err != nil {
			return nil, fmt.Errorf("key is not hex (format=hex): %v", hexErr(err))
		}
	case "binary":
		raw = b
	default:
		return nil, fmt.Errorf("key format %q: want hex or binary", format)
	}
	return NewKey(raw, mode)
}

// hexErr strips the offending byte out of hex decoding errors, which could
// otherwise echo key material.
func hexErr(err error) string {
	if _, ok := err.(hex.InvalidByteError); ok {
		return "invalid character"
	}
	return "odd length"
}

// KeyFromFile reads a key file (swtpm's --key file=...,format=,mode=,remove=).
// With remove, the file is deleted after reading.
func KeyFromFile(path, format, mode string, remove bool) (*Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading key file: %w", err)
	}
	k, err := KeyFromBytes(b, format, mode)
	if err != nil {
		return nil, fmt.Errorf("key file %s: %w", path, err)
	}
	if remove {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing key file: %w", err)
		}
	}
	return k, nil
}

// KeyFromFD reads a key from an inherited file descriptor (--key fd=N) and
// closes it.
func KeyFromFD(fd int, format, mode string) (*Key, error) {
	b, err := readFD(fd)
	if err != nil {
		return nil, err
	}
	k, err := KeyFromBytes(b, format, mode)
	if err != nil {
		return nil, fmt.Errorf("key from fd %d: %w", fd, err)
	}
	return k, nil
}

// KeyFromPassword derives a key from a password (--key pwdfile= / pwdfd=).
// kdf "pbkdf2" (default) is PBKDF2-HMAC-SHA256 with PasswordSalt and
// PasswordIterations; "sha512" is swtpm's legacy single SHA-512, accepted
// for compatibility only.
func KeyFromPassword(pw []byte, kdf, mode string) (*Key, error) {
	pw = bytes.TrimRight(pw, "\r\n")
	if len(pw) == 0 {
		return nil, fmt.Errorf("password is empty")
	}
	var raw []byte
	switch kdf {
	case "", "pbkdf2":
		var err error
		if raw, err = pbkdf2.Key(sha256.New, string(pw), []byte(PasswordSalt), PasswordIterations, 32); err != nil {
			return nil, fmt.Errorf("password KDF: %w", err)
		}
	case "sha512":
		sum := sha512.Sum512(pw)
		raw = sum[:32]
	default:
		return nil, fmt.Errorf("kdf %q: want pbkdf2 or sha512", kdf)
	}
	return NewKey(raw, mode)
}

// PasswordFromFile reads a password file; PasswordFromFD reads and closes
// an inherited descriptor.
func PasswordFromFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading password file: %w", err)
	}
	return b, nil
}

func PasswordFromFD(fd int) ([]byte, error) { return readFD(fd) }

func readFD(fd int) ([]byte, error) {
	f := os.NewFile(uintptr(fd), fmt.Sprintf("fd%d", fd))
	if f == nil {
		return nil, fmt.Errorf("fd %d is not open", fd)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("reading fd %d: %w", fd, err)
	}
	return b, nil
}

// migrationBlobID frames state blobs sealed with the --migration-key.
const migrationBlobID = 0xff00

// Seal and Open let a Key protect state blobs in transit (swtpm's
// --migration-key, CMD_GET_STATEBLOB / CMD_SET_STATEBLOB): the blob gets the
// state file framing, sealed under a key derived for migration only.
func (k *Key) Seal(plain []byte) ([]byte, error) { return seal(k, migrationBlobID, 0, plain) }

// Open checks and decrypts a blob made by Seal with the same key.
func (k *Key) Open(sealed []byte) ([]byte, error) {
	plain, _, err := open(k, migrationBlobID, sealed)
	if err != nil {
		return nil, fmt.Errorf("state blob sealed with the migration key: %w", err)
	}
	return plain, nil
}

// transferBlobBase offsets the blob ids of state sealed for transfer, so a
// transfer envelope is never taken for a state file or the reverse.
const transferBlobBase = 0x0100

// transferKey derives the key that seals one instance's state in transit:
// an envelope sealed for another instance fails as "another key".
func (k *Key) transferKey(instance string) (*Key, error) {
	raw, err := hkdf.Key(sha256.New, k.master, nil, "cvtpm transfer v1\x00"+instance, 32)
	if err != nil {
		return nil, fmt.Errorf("deriving the transfer key: %w", err)
	}
	return NewKey(raw, k.Cipher())
}

// SealTransfer seals a libtpms state blob (name "permall",
// "volatilestate" or "savestate") of instance for transfer to a backend
// that holds the same migration key k. The envelope binds the instance (its
// key is derived from the instance id), the blob name and gen, the
// instance's state generation when it was taken.
func (k *Key) SealTransfer(instance, name string, gen uint64, plain []byte) ([]byte, error) {
	id, err := blobID(name)
	if err != nil {
		return nil, err
	}
	tk, err := k.transferKey(instance)
	if err != nil {
		return nil, err
	}
	return seal(tk, transferBlobBase+id, gen, plain)
}

// ErrNotTransfer: the bytes are not a transfer envelope at all (plaintext
// swtpm state, garbage, a state file).
var ErrNotTransfer = errors.New("not a state blob sealed by a cvtpm backend")

// OpenTransfer checks and opens an envelope made by SealTransfer for the
// same instance and blob name, returning the blob and its generation.
// Errors: ErrNotTransfer, ErrWrongKey (sealed for another instance or under
// another migration key), ErrCorrupt, ErrTruncated, ErrSwapped (another
// blob type).
func (k *Key) OpenTransfer(instance, name string, b []byte) ([]byte, uint64, error) {
	id, err := blobID(name)
	if err != nil {
		return nil, 0, err
	}
	if len(b) < len(magic) || !bytes.Equal(b[:len(magic)], magic[:]) {
		return nil, 0, ErrNotTransfer
	}
	tk, err := k.transferKey(instance)
	if err != nil {
		return nil, 0, err
	}
	h, err := parseHeader(b)
	if err == nil && h.cipher == cipherNone {
		return nil, 0, fmt.Errorf("%w: it is unencrypted", ErrNotTransfer)
	}
	if err == nil && (h.blobID < transferBlobBase || h.blobID > transferBlobBase+0xff) {
		return nil, 0, fmt.Errorf("%w: it is a state file (blob id %d), not a transfer envelope", ErrNotTransfer, h.blobID)
	}
	plain, gen, err := open(tk, transferBlobBase+id, b)
	if errors.Is(err, ErrWrongKey) {
		return nil, 0, fmt.Errorf("%w: sealed for another instance, or by a backend with another migration key", err)
	}
	return plain, gen, err
}
