package main

// Opening the TPM's state directory for "cvtpm socket".

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/swtpmproto"
)

// sealedStateSupported reports whether --key and --migration-key work, so
// that --print-capabilities only claims what this build has.
const sealedStateSupported = false

// stateStore is what the socket command needs of the state directory.
type stateStore interface {
	engine.Storage
	Lock() error
	Close() error
}

// openState opens the state directory named by --tpmstate with the keys of
// --key and --migration-key.
//
// TODO(E): switch to vtpm/statestore (sealed, generation-checked) as soon as
// it lands; until then state is kept unencrypted and --key is refused.
func openState(cfg *socketConfig, log *slog.Logger) (stateStore, swtpmproto.BlobSealer, error) {
	if cfg.key != nil {
		return nil, nil, errors.New("--key: sealed state needs vtpm/statestore, which this build lacks")
	}
	if cfg.migrationKey != nil {
		return nil, nil, errors.New("--migration-key: needs vtpm/statestore, which this build lacks")
	}
	return &plainDir{dir: cfg.stateDir}, nil, nil
}

// plainDir is an interim unencrypted, atomically written state directory.
type plainDir struct{ dir string }

func (d *plainDir) path(name string) string { return filepath.Join(d.dir, "cvtpm-plain."+name) }

// Load reads a blob; without one of ours it falls back to an unencrypted
// swtpm blob (tpm2-00.<name>, as swtpm_setup writes it), so a state
// directory made for swtpm keeps its EK, certificates and NV contents.
func (d *plainDir) Load(name string) ([]byte, error) {
	b, err := os.ReadFile(d.path(name))
	if !errors.Is(err, os.ErrNotExist) {
		return b, err
	}
	sw, swErr := os.ReadFile(filepath.Join(d.dir, "tpm2-00."+name))
	if swErr != nil {
		return nil, err
	}
	plain, decErr := swtpmproto.DecodeStateBlob(sw, nil)
	if decErr != nil {
		return nil, fmt.Errorf("importing swtpm state %s: %w", "tpm2-00."+name, decErr)
	}
	return plain, nil
}

func (d *plainDir) Save(name string, data []byte) error {
	tmp := d.path(name) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, d.path(name)); err != nil {
		return fmt.Errorf("renaming %s: %w", tmp, err)
	}
	if dir, err := os.Open(d.dir); err == nil {
		dir.Sync()
		dir.Close()
	}
	return nil
}

func (d *plainDir) Delete(name string) error {
	if err := os.Remove(d.path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (d *plainDir) Lock() error  { return nil }
func (d *plainDir) Close() error { return nil }
