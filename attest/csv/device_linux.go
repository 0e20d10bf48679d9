package csv

import (
	"context"
	"crypto/subtle"
	"fmt"
	"io"
	"os"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// csvReportReq is the driver's ioctl argument: { u8 *buf; int len; }.
type csvReportReq struct {
	buf *byte
	len int32
	_   int32
}

// csvCmdGetReport is _IOWR('D', 1, struct csv_report_req).
var csvCmdGetReport = uintptr(3<<30 | uint32(unsafe.Sizeof(csvReportReq{}))<<16 | 'D'<<8 | 1)

// Report asks the firmware for a v1 report over reportData. The request page
// starts with data[64] || mnonce[16] || SM3(data || mnonce); the answer must
// echo our mnonce and carry a MAC keyed with it.
func (d *Device) Report(ctx context.Context, reportData []byte) ([]byte, error) {
	if len(reportData) > 64 {
		return nil, fmt.Errorf("report_data is %d bytes, at most 64", len(reportData))
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var mnonce [16]byte
	if _, err := io.ReadFull(randReader, mnonce[:]); err != nil {
		return nil, fmt.Errorf("mnonce: %w", err)
	}
	buf := reportRequest(reportData, mnonce)

	f, err := os.OpenFile(d.Path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open CSV guest device: %w", err)
	}
	defer f.Close()
	req := csvReportReq{buf: &buf[0], len: int32(len(buf))}
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), csvCmdGetReport, uintptr(unsafe.Pointer(&req)))
	runtime.KeepAlive(buf)
	if errno != 0 {
		return nil, fmt.Errorf("CSV_CMD_GET_REPORT on %s: %w", d.Path, errno)
	}
	r, err := ParseReport(buf)
	if err != nil {
		return nil, fmt.Errorf("report from device: %w", err)
	}
	if subtle.ConstantTimeCompare(r.MNonce[:], mnonce[:]) != 1 {
		return nil, fmt.Errorf("report from device: mnonce does not echo the request")
	}
	mac := r.ComputeMAC()
	if subtle.ConstantTimeCompare(mac[:], r.MAC[:]) != 1 {
		return nil, fmt.Errorf("report from device: MAC does not verify")
	}
	return buf, nil
}
