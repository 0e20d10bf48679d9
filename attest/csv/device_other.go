//go:build !linux

package csv

import (
	"context"
	"errors"
)

// Report is unavailable: the CSV guest driver exists only on Linux.
func (d *Device) Report(context.Context, []byte) ([]byte, error) {
	return nil, errors.New("CSV guest device is Linux-only")
}
