//go:build !linux

package guestkit

import (
	"context"
	"errors"
)

// ServeVTPMProxy needs Linux's vtpm_proxy driver.
func (p *Proxy) ServeVTPMProxy(context.Context, func(string)) error {
	return errors.New("vtpm_proxy devices exist only on Linux")
}
