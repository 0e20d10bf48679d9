//go:build linux && (amd64 || arm64)

package csv

import "testing"

func TestIoctlNumber(t *testing.T) {
	// _IOWR('D', 1, struct { u8 *buf; int len; }) on 64-bit Linux.
	if csvCmdGetReport != 0xc0104401 {
		t.Fatalf("CSV_CMD_GET_REPORT = %#x, want 0xc0104401", csvCmdGetReport)
	}
}
