// Package gcm makes the two AEADs cvtpm seals with: AES-256-GCM and SM4-GCM
// (gmsm), chosen by name, so every place that encrypts offers SM4 the same
// way.
package gcm

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"

	"github.com/emmansun/gmsm/sm4"
)

// The cipher names.
const (
	AES256 = "aes-256-gcm"
	SM4    = "sm4-gcm"
)

// KeySize is the key length name's cipher takes (32 for AES-256, 16 for
// SM4); 0 for an unknown name.
func KeySize(name string) int {
	switch name {
	case AES256:
		return 32
	case SM4:
		return 16
	}
	return 0
}

// New returns the AEAD called name with key (KeySize(name) bytes).
func New(name string, key []byte) (cipher.AEAD, error) {
	var block cipher.Block
	var err error
	switch name {
	case AES256:
		block, err = aes.NewCipher(key)
	case SM4:
		block, err = sm4.NewCipher(key)
	default:
		return nil, fmt.Errorf("cipher %q: want %s or %s", name, AES256, SM4)
	}
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}
