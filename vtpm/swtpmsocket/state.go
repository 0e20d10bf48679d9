package swtpmsocket

// Opening the TPM's state directory for "cvtpm socket".

import (
	"fmt"
	"log/slog"
	"os"

	"cvtpm/internal/dirlock"
	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/swtpmproto"
)

// sealedStateSupported reports whether --key and --migration-key work, so
// that --print-capabilities only claims what this build has.
const sealedStateSupported = true

// stateStore is what the socket command needs of the state directory.
type stateStore interface {
	engine.Storage
	Lock() error
	Close() error
}

// openState opens the state directory named by --tpmstate, sealed with the
// --key, and returns the --migration-key's sealer for state blobs. A
// directory that only holds unencrypted swtpm state is imported.
// openState opens the state directory; locked is its lock if the caller
// took it already (released here if opening fails).
func openState(cfg *socketConfig, log *slog.Logger, locked *dirlock.Lock) (stateStore, swtpmproto.BlobSealer, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	key, err := loadKey("--key", cfg.key, log)
	if err != nil {
		locked.Release()
		return nil, nil, err
	}
	migrationKey, err := loadKey("--migration-key", cfg.migrationKey, log)
	if err != nil {
		locked.Release()
		return nil, nil, err
	}
	store, err := statestore.Open(cfg.stateDir, statestore.Options{
		Key:    key,
		Lock:   cfg.stateLock && !cfg.migrationIncoming,
		Locked: locked,
		// As swtpm: a directory swtpm_setup prepared is used as it is.
		// `cvtpm socket` runs on the operator's own machine; the backend's
		// workers never import implicitly.
		ImportSwtpm: true,
		Logger:      log,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("--tpmstate: %w", err)
	}
	if migrationKey == nil {
		return store, nil, nil
	}
	return store, migrationKey, nil
}

// loadKey reads a --key or --migration-key from its file, descriptor or
// password.
func loadKey(opt string, spec *keySpec, log *slog.Logger) (*statestore.Key, error) {
	if spec == nil {
		return nil, nil
	}
	var (
		k   *statestore.Key
		err error
	)
	switch {
	case spec.file != "":
		k, err = statestore.KeyFromFile(spec.file, spec.format, spec.mode, spec.remove)
	case spec.fd >= 0:
		k, err = statestore.KeyFromFD(spec.fd, spec.format, spec.mode)
	default:
		var pw []byte
		if spec.pwdfile != "" {
			pw, err = statestore.PasswordFromFile(spec.pwdfile)
			if err == nil && spec.remove {
				err = os.Remove(spec.pwdfile)
			}
		} else {
			pw, err = statestore.PasswordFromFD(spec.pwdfd)
		}
		if err == nil {
			k, err = statestore.KeyFromPassword(pw, spec.kdf, spec.mode)
		}
		clear(pw)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", opt, err)
	}
	if k.NoteMappedMode != "" {
		log.Warn("swtpm's CBC mode is not supported; sealing with AES-256-GCM instead", "option", opt, "mode", k.NoteMappedMode)
	}
	return k, nil
}
