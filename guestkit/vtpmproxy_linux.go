package guestkit

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The Linux vtpm_proxy driver (CONFIG_TCG_VTPM_PROXY) creates a /dev/tpmN
// whose commands a user-space process answers: the kernel and every
// program in the guest then use the backend instance as their TPM.

const (
	vtpmxPath         = "/dev/vtpmx"
	vtpmProxyFlagTPM2 = 1
	// VTPM_PROXY_IOC_NEW_DEV = _IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev)
	vtpmProxyIocNewDev = 0xc014a100
	// The driver's vendor command for locality changes (TPM2_CC_SET_LOCALITY).
	ccSetLocality = 0x20001000
)

type vtpmProxyNewDev struct {
	Flags, TPMNum, FD, Major, Minor uint32
}

// ServeVTPMProxy creates a TPM 2.0 device through /dev/vtpmx and answers
// its commands with the backend instance until ctx ends or the device
// goes away. ready, if not nil, receives the device name (e.g.
// "/dev/tpm1") once the device exists.
func (p *Proxy) ServeVTPMProxy(ctx context.Context, ready func(dev string)) error {
	ctl, err := os.OpenFile(vtpmxPath, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("vtpm_proxy: %w (is the tpm_vtpm_proxy module loaded?)", err)
	}
	defer ctl.Close()
	req := vtpmProxyNewDev{Flags: vtpmProxyFlagTPM2}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, ctl.Fd(), vtpmProxyIocNewDev, uintptr(unsafe.Pointer(&req))); errno != 0 {
		return fmt.Errorf("vtpm_proxy: creating a device: %w", errno)
	}
	dev := os.NewFile(uintptr(req.FD), "vtpm-proxy")
	defer dev.Close()
	if ready != nil {
		ready(fmt.Sprintf("/dev/tpm%d", req.TPMNum))
	}
	stop := context.AfterFunc(ctx, func() { dev.Close() })
	defer stop()
	var locality uint8
	buf := make([]byte, 4096+128)
	for {
		// The driver hands over one whole command per read.
		n, err := dev.Read(buf)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return fmt.Errorf("vtpm_proxy: reading a command: %w", err)
		}
		cmd := buf[:n]
		var resp []byte
		if n >= 11 && binary.BigEndian.Uint32(cmd[6:10]) == ccSetLocality {
			locality = cmd[10]
			resp = []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}
		} else {
			resp = p.tpm.ExecuteAt(nil, cmd, locality)
		}
		if _, err := dev.Write(resp); err != nil {
			return fmt.Errorf("vtpm_proxy: writing a response: %w", err)
		}
	}
}
