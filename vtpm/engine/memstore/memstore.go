// Package memstore is an in-memory engine.Storage for tests: libtpms'
// blobs in a map, safe for concurrent use.
package memstore

import (
	"bytes"
	"fmt"
	"io/fs"
	"sync"
)

// Store keeps blobs by name.
type Store struct {
	mu    sync.Mutex
	blobs map[string][]byte
}

// New returns an empty Store.
func New() *Store { return &Store{blobs: map[string][]byte{}} }

// Load returns a copy of the blob, or an error matching fs.ErrNotExist.
func (m *Store) Load(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[name]
	if !ok {
		return nil, fmt.Errorf("blob %s: %w", name, fs.ErrNotExist)
	}
	return bytes.Clone(b), nil
}

// Save stores a copy of data.
func (m *Store) Save(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.blobs[name] = bytes.Clone(data)
	return nil
}

// Delete removes the blob.
func (m *Store) Delete(name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.blobs, name)
	return nil
}

// Has reports whether a blob is stored.
func (m *Store) Has(name string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.blobs[name]
	return ok
}
