package main

// Opening the TPM's sealed state directory for "cvtpm socket".

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/swtpmproto"
)

// sealedStateSupported reports whether --key works, so that
// --print-capabilities only claims what this build has.
const sealedStateSupported = true

// stateStore is what the socket command needs of the state directory.
type stateStore interface {
	engine.Storage
	Lock() error
	Close() error
}

// openState opens the state directory named by --tpmstate, sealed with the
// --key key. An unencrypted swtpm state directory (swtpm_setup's
// tpm2-00.permall and friends) is imported on first use.
func openState(cfg *socketConfig, log *slog.Logger) (stateStore, swtpmproto.BlobSealer, error) {
	var key *statestore.Key
	if cfg.key != nil {
		var err error
		if key, err = loadKey("--key", cfg.key); err != nil {
			return nil, nil, err
		}
	}
	if cfg.migrationKey != nil {
		// statestore exposes no sealing primitive for transfers yet.
		return nil, nil, errors.New("--migration-key is not supported yet: state blobs are transferred unencrypted; protect the migration channel instead")
	}
	store, err := statestore.Open(cfg.stateDir, statestore.Options{
		Key:    key,
		Lock:   cfg.stateLock,
		Import: func(b []byte) ([]byte, error) { return swtpmproto.DecodeStateBlob(b, nil) },
		Logger: log,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("--tpmstate: %w", err)
	}
	return store, nil, nil
}

// loadKey reads the key of --key (file=, fd=, pwdfile=, pwdfd=).
func loadKey(opt string, k *keySpec) (*statestore.Key, error) {
	var key *statestore.Key
	var err error
	switch {
	case k.file != "":
		key, err = statestore.KeyFromFile(k.file, k.format, k.mode, k.remove)
	case k.fd >= 0:
		key, err = statestore.KeyFromFD(k.fd, k.format, k.mode)
	default:
		var pw []byte
		if k.pwdfile != "" {
			pw, err = statestore.PasswordFromFile(k.pwdfile)
			if err == nil && k.remove {
				err = os.Remove(k.pwdfile)
			}
		} else {
			pw, err = statestore.PasswordFromFD(k.pwdfd)
		}
		if err == nil {
			key, err = statestore.KeyFromPassword(pw, k.kdf, k.mode)
		}
		clear(pw)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opt, err)
	}
	return key, nil
}
