//go:build !linux

package sockmap

import (
	"context"
	"errors"
	"net"
)

// Joiner is unavailable outside Linux.
type Joiner struct{}

// New always fails outside Linux.
func New() (*Joiner, error) { return nil, errors.New("sockmap: Linux only") }

// Join always fails outside Linux.
func (j *Joiner) Join(ctx context.Context, a, b net.Conn) error { return ErrUnsupported }

// Close does nothing.
func (j *Joiner) Close() error { return nil }
