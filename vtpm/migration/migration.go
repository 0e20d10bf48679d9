// Package migration lets an instance's TPM state leave its backend only
// sealed, and come back only if an attested backend sealed it for this very
// instance and it is not older than the state it replaces.
//
// QEMU migrates a TPM with swtpm's CMD_GET_STATEBLOB / CMD_SET_STATEBLOB,
// through the host. In a confidential backend the host must neither read
// that state (it holds the seeds, every key, NV secrets and their
// passwords) nor load state of its own making. TPM wraps the instance's
// engine so that state calls on the link carry only envelopes sealed with
// the backend's migration key (statestore.Key.SealTransfer): the key is
// derived per instance, and each envelope binds the blob type and the
// instance's state generation when it was taken. Loading
//
//   - refuses anything that is not such an envelope (plaintext swtpm state,
//     garbage), an envelope for another instance or from a backend with
//     another migration key, and one older than the state the instance
//     had when loading began (a replay);
//   - hands the blob to libtpms, which checks it before anything is stored;
//   - raises the instance's generation to the envelope's, so the state it
//     replaced can never be loaded back.
//
// The backend worker is the only user: plaintext state never leaves its
// process.
package migration

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/swtpmproto"
	"cvtpm/vtpm/tpmrpc"
)

// Generations is the part of the instance's state store that orders state
// in time (*statestore.Store).
type Generations interface {
	Generation() uint64
	RaiseGeneration(gen uint64) error
}

// TPM is an instance's TPM whose state transfers are sealed. Every other
// call goes to the embedded TPM unchanged.
type TPM struct {
	swtpmproto.TPM
	// Key is the backend's migration key; nil means state never leaves
	// this backend (and none is accepted).
	Key      *statestore.Key
	Instance string
	Store    Generations
	Logger   *slog.Logger

	mu      sync.Mutex
	loading bool   // a SetState since the last Init
	floor   uint64 // the generation when loading began
}

// ErrNoMigrationKey: this backend holds no migration key.
var ErrNoMigrationKey = errors.New("this backend has no migration key: state cannot leave or enter it")

// ErrNoBlob: the instance has no such state blob (no savestate, as a rule);
// swtpm answers TPM_RETRY, and so does the backend.
var ErrNoBlob = fmt.Errorf("%w (TPM_RETRY)", tpmrpc.ErrNoState)

// ErrOlder: the envelope is older than the instance's state.
var ErrOlder = errors.New("state blob is not newer than the instance's state (replay refused)")

// Init ends a loading sequence.
func (t *TPM) Init(flags uint32) uint32 {
	t.mu.Lock()
	t.loading = false
	t.mu.Unlock()
	return t.TPM.Init(flags)
}

// ExportState returns blob blobType (swtpm's numbering) sealed for transfer.
func (t *TPM) ExportState(blobType uint32) ([]byte, error) {
	name := engine.StateName(blobType)
	if name == "" {
		return nil, fmt.Errorf("unknown state blob type %d", blobType)
	}
	if t.Key == nil {
		return nil, ErrNoMigrationKey
	}
	plain, rc := t.TPM.GetState(blobType)
	if rc == engine.RCRetry {
		return nil, ErrNoBlob
	}
	if rc != 0 {
		return nil, fmt.Errorf("reading the %s state: TPM result %#x", name, rc)
	}
	gen := t.Store.Generation()
	env, err := t.Key.SealTransfer(t.Instance, name, gen, plain)
	clear(plain)
	if err != nil {
		return nil, fmt.Errorf("sealing the %s state: %w", name, err)
	}
	t.log().Info("state sealed for migration", "blob", name, "generation", gen)
	return env, nil
}

// ImportState opens an envelope and, if it passes every check, hands the
// blob to the stopped TPM for its next Init.
func (t *TPM) ImportState(blobType uint32, env []byte) error {
	name := engine.StateName(blobType)
	if name == "" {
		return fmt.Errorf("unknown state blob type %d", blobType)
	}
	if t.Key == nil {
		return ErrNoMigrationKey
	}
	if t.TPM.Running() {
		return errors.New("the TPM is running: stop it before loading state")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.loading {
		t.loading, t.floor = true, t.Store.Generation()
	}
	if len(env) == 0 {
		// QEMU sends an empty blob for one the source did not have. Dropping
		// volatile or saved state is what a reset does anyway; the
		// permanent state (seeds, NV) is never dropped this way.
		if blobType == engine.StatePermanent {
			return errors.New("an empty permanent state is refused: the instance's TPM is not wiped through the host path")
		}
		if rc := t.TPM.SetState(blobType, nil); rc != 0 {
			return fmt.Errorf("clearing the %s state: TPM result %#x", name, rc)
		}
		return nil
	}
	plain, gen, err := t.Key.OpenTransfer(t.Instance, name, env)
	if err != nil {
		if errors.Is(err, statestore.ErrNotTransfer) {
			return fmt.Errorf("%s state refused: %w; plaintext or host-made state is never loaded through the host path (an administrator imports swtpm state with 'cvtpm backend create --import')", name, err)
		}
		return fmt.Errorf("%s state refused: %w", name, err)
	}
	defer clear(plain)
	if gen <= t.floor {
		return fmt.Errorf("%s state refused: %w: generation %d, the instance is at %d", name, ErrOlder, gen, t.floor)
	}
	if rc := t.TPM.SetState(blobType, plain); rc != 0 {
		return fmt.Errorf("%s state refused by libtpms (TPM result %#x); the instance's state is unchanged", name, rc)
	}
	if err := t.Store.RaiseGeneration(gen); err != nil {
		return fmt.Errorf("%s state loaded, but recording its generation failed: %w", name, err)
	}
	t.log().Info("migrated state loaded", "blob", name, "generation", gen)
	return nil
}

// Generation is the instance's state generation (the backend anchors it
// with the key broker).
func (t *TPM) Generation() uint64 { return t.Store.Generation() }

// GetState and SetState are not for the link: state leaves and enters
// only through ExportState and ImportState.
func (t *TPM) GetState(uint32) ([]byte, uint32) { return nil, engine.RCFail }

// SetState: see GetState.
func (t *TPM) SetState(uint32, []byte) uint32 { return engine.RCFail }

func (t *TPM) log() *slog.Logger {
	if t.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return t.Logger
}
