package backend

import (
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
)

// KeySource gives the key that seals an instance's state. The development
// source derives it from a master key in a file; a key broker that releases
// a secret only after checking this CVM's CSV evidence plugs in here.
type KeySource interface {
	InstanceKey(ctx context.Context, instance string) ([]byte, error)
}

// MasterKey derives per-instance keys from one master key with
// HKDF-SHA256 (info "cvtpm instance key v1" || instance id), so instances
// never share a key and a leaked instance key reveals nothing of another.
type MasterKey struct{ key []byte }

// NewMasterKey returns a KeySource for a master key of 32 or more bytes.
func NewMasterKey(key []byte) (*MasterKey, error) {
	if len(key) < 32 {
		return nil, fmt.Errorf("master key is %d bytes: want at least 32", len(key))
	}
	return &MasterKey{key: append([]byte(nil), key...)}, nil
}

// MasterKeyFromFile reads a hex-encoded master key (as `openssl rand -hex
// 32` writes) from path.
func MasterKeyFromFile(path string) (*MasterKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("master key: %w", err)
	}
	key, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		// Never echo the file's bytes: they are the secret.
		return nil, fmt.Errorf("master key %s: not hex", path)
	}
	return NewMasterKey(key)
}

// MasterKeyFromFD reads a hex-encoded master key from an inherited file
// descriptor (e.g. a pipe from a secret manager) and closes it, so the key
// never touches the file system.
func MasterKeyFromFD(fd int) (*MasterKey, error) {
	f := os.NewFile(uintptr(fd), "master-key")
	if f == nil {
		return nil, fmt.Errorf("master key: fd %d is not open", fd)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("master key from fd %d: %w", fd, err)
	}
	key, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, fmt.Errorf("master key from fd %d: not hex", fd)
	}
	return NewMasterKey(key)
}

// InstanceKey implements KeySource.
func (m *MasterKey) InstanceKey(_ context.Context, instance string) ([]byte, error) {
	return hkdf.Key(sha256.New, m.key, nil, "cvtpm instance key v1\x00"+instance, 32)
}

// Bytes returns a copy of the key (to hand to workers through a pipe).
func (m *MasterKey) Bytes() []byte { return append([]byte(nil), m.key...) }

// String keeps the key out of logs.
func (m *MasterKey) String() string { return "backend.MasterKey{redacted}" }
