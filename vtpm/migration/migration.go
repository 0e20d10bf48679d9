// Package migration is the worker's half of moving an instance's TPM
// state between backends: state leaves a backend only sealed, and comes
// back only if an attested backend sealed it for this very instance and
// it is not older than the state it replaces.
//
// QEMU migrates a TPM with swtpm's CMD_GET_STATEBLOB / CMD_SET_STATEBLOB,
// through the host. In a confidential backend the host must neither read
// that state (it holds the seeds, every key, NV secrets and their
// passwords) nor load state of its own making. The backend's supervisor
// holds the migration key and seals what leaves (statestore.Key.SealTransfer:
// an envelope bound to the instance, the blob type and the state generation
// when it was taken) and opens what arrives, refusing anything that is not
// such an envelope for this instance. The worker, which runs libtpms on
// commands the host and the guest send, never holds that key: a worker
// taken over through a libtpms bug cannot open or forge other instances'
// migrations. TPM, here, wraps the instance's engine so that on the
// worker's socketpair state calls carry tpmrpc plain state messages
// (generation and blob), and loading
//
//   - refuses state older than the state the instance had when loading
//     began (a replay);
//   - hands the blob to libtpms, which checks it before anything is stored;
//   - raises the instance's generation to the blob's, so the state it
//     replaced can never be loaded back.
package migration

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/swtpmproto"
	"cvtpm/vtpm/tpmrpc"
)

// Generations is the part of the instance's state store that orders state
// in time (*statestore.Store).
type Generations interface {
	Generation() uint64
	RaiseGeneration(gen uint64) error
}

// TPM is an instance's TPM whose state transfers carry generations for
// the supervisor to seal. Every other call goes to the embedded TPM
// unchanged.
type TPM struct {
	swtpmproto.TPM
	Store  Generations
	Logger *slog.Logger

	mu      sync.Mutex
	loading bool   // a SetState since the last Init
	floor   uint64 // the generation when loading began
}

// ErrNoBlob: the instance has no such state blob (no savestate, as a rule);
// swtpm answers TPM_RETRY, and so does the backend.
var ErrNoBlob = fmt.Errorf("%w (TPM_RETRY)", tpmrpc.ErrNoState)

// ErrOlder: the state is older than the instance's state.
var ErrOlder = errors.New("state blob is not newer than the instance's state (replay refused)")

// Init ends a loading sequence.
func (t *TPM) Init(flags uint32) uint32 {
	t.mu.Lock()
	t.loading = false
	t.mu.Unlock()
	return t.TPM.Init(flags)
}

// ExportState returns blob blobType (swtpm's numbering) with the
// instance's generation, as a tpmrpc plain state message, for the
// supervisor to seal.
func (t *TPM) ExportState(blobType uint32) ([]byte, error) {
	name := engine.StateName(blobType)
	if name == "" {
		return nil, fmt.Errorf("unknown state blob type %d", blobType)
	}
	plain, rc := t.TPM.GetState(blobType)
	if rc == engine.RCRetry {
		return nil, ErrNoBlob
	}
	if rc != 0 {
		return nil, fmt.Errorf("reading the %s state: TPM result %#x", name, rc)
	}
	msg := tpmrpc.AppendPlainState(nil, t.Store.Generation(), plain)
	clear(plain)
	return msg, nil
}

// ImportState takes a tpmrpc plain state message (the supervisor opened
// the envelope it came in) and, if it is newer than the instance's state,
// hands the blob to the stopped TPM for its next Init. An empty msg drops
// a volatile or saved state.
func (t *TPM) ImportState(blobType uint32, msg []byte) error {
	name := engine.StateName(blobType)
	if name == "" {
		return fmt.Errorf("unknown state blob type %d", blobType)
	}
	if t.TPM.Running() {
		return errors.New("the TPM is running: stop it before loading state")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.loading {
		t.loading, t.floor = true, t.Store.Generation()
	}
	if len(msg) == 0 {
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
	gen, plain, err := tpmrpc.ParsePlainState(msg)
	if err != nil {
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
