package guestkit

import (
	"context"
	"strings"
	"testing"
	"unsafe"
)

// The ioctl request matches the kernel's _IOWR(0xa1, 0x00, struct
// vtpm_proxy_new_dev): direction read|write, 20-byte argument.
func TestVTPMProxyIoctl(t *testing.T) {
	size := unsafe.Sizeof(vtpmProxyNewDev{})
	if size != 20 {
		t.Fatalf("struct vtpm_proxy_new_dev is %d bytes, want 20", size)
	}
	want := uint32(3)<<30 | uint32(size)<<16 | 0xa1<<8 | 0x00
	if vtpmProxyIocNewDev != want {
		t.Fatalf("ioctl %#x, want %#x", vtpmProxyIocNewDev, want)
	}
}

// Without the driver the error says what is missing. (This machine's
// kernel has no vtpm_proxy module, so the device path itself is not
// exercised by the test suite.)
func TestVTPMProxyMissingDriver(t *testing.T) {
	p := &Proxy{}
	err := p.ServeVTPMProxy(context.Background(), nil)
	if err == nil {
		t.Skip("/dev/vtpmx exists here; the error path is not reachable")
	}
	if !strings.Contains(err.Error(), "tpm_vtpm_proxy") && !strings.Contains(err.Error(), "creating a device") {
		t.Fatalf("error does not name the driver: %v", err)
	}
}
