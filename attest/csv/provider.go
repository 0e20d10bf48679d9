package csv

import (
	"context"

	"errors"
	"fmt"
	"github.com/emmansun/gmsm/sm3"
	"os"
)

// ReportProvider gives "a report whose report_data is X". Callers never care
// whether a real CSV guest device or the simulator answered, except through
// the verified claims (Claims.Simulated).
type ReportProvider interface {
	Report(ctx context.Context, reportData []byte) ([]byte, error)
}

// DevicePath is the CSV guest driver's device node.
const DevicePath = "/dev/csv-guest"

// ProviderOptions choose a ReportProvider.
type ProviderOptions struct {
	// DevicePath overrides /dev/csv-guest (tests).
	DevicePath string
	// SimulatorDir, if set, allows falling back to the simulator saved
	// there (created if missing) when no device exists. Without it a
	// missing device is an error: nothing silently turns into a simulator.
	SimulatorDir string
}

// ErrNoDevice means no CSV guest device exists and no simulator was allowed.
var ErrNoDevice = errors.New("no CSV guest device (" + DevicePath + ") and no simulator configured")

// OpenProvider returns the guest device if it exists, else the simulator
// from opts.SimulatorDir if one was explicitly allowed.
func OpenProvider(opts ProviderOptions) (ReportProvider, error) {
	path := opts.DevicePath
	if path == "" {
		path = DevicePath
	}
	if _, err := os.Stat(path); err == nil {
		return &Device{Path: path}, nil
	}
	if opts.SimulatorDir == "" {
		return nil, ErrNoDevice
	}
	s, err := LoadSimulator(opts.SimulatorDir)
	if errors.Is(err, os.ErrNotExist) {
		// Never a new chip behind a typo: a simulated chip is made on
		// purpose, and the policies that trust it name its root.
		return nil, fmt.Errorf("no CSV simulator in %s (make one with 'cvtpm csv simulate --out %s')", opts.SimulatorDir, opts.SimulatorDir)
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Device asks the CSV firmware for reports through /dev/csv-guest.
type Device struct {
	Path string
}

// reportRequest builds the page handed to CSV_CMD_GET_REPORT: data[64] ||
// mnonce[16] || SM3(data || mnonce), the rest zero. The firmware overwrites
// it with the report.
func reportRequest(reportData []byte, mnonce [16]byte) []byte {
	buf := make([]byte, ReportPage)
	copy(buf[:64], reportData)
	copy(buf[64:80], mnonce[:])
	h := sm3.Sum(buf[:80])
	copy(buf[80:112], h[:])
	return buf
}
