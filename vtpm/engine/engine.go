// Package engine runs the process's one TPM 2.0 (libtpms through cgo) with
// swtpm's semantics: running and stopped states, init flags, locality, the
// TPM-established flag, cancel, hash start/data/end, buffer size, state blobs
// and info. libtpms keeps global C state, so a process holds at most one TPM;
// New enforces that.
//
// Every libtpms call happens on the caller's goroutine (or a stream loop's
// thread, stream.go) under one lock: no goroutine hand-off per command,
// because on loopback the I/O path, not libtpms, dominates small-command
// latency. The lock is C's (stream.c), so that a stream loop can take it
// without returning to Go.
package engine

/*
#include <stdlib.h>
#include <malloc.h>
#include <stdint.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>
#include <libtpms/tpm_tis.h>
#include "stream.h"

extern TPM_MODIFIER_INDICATOR cvtpm_locality;
TPM_RESULT cvtpm_register_callbacks(void);
*/
import "C"

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"slices"
	"sync"
	"unsafe"
)

// Storage is where libtpms' blobs live; statestore.Store satisfies it.
// Load must return an error matching fs.ErrNotExist for a missing blob.
// Save must not keep data after it returns: it may be libtpms' own memory.
type Storage interface {
	Load(name string) ([]byte, error)
	Save(name string, data []byte) error
	Delete(name string) error
}

// libtpms' blob names, as passed to the NVRAM callbacks.
const (
	BlobPermanent = "permall"
	BlobVolatile  = "volatilestate"
	BlobSaveState = "savestate"
)

// State blob types: swtpm's PTM_BLOB_TYPE_* values. They are plain uint32
// so that interfaces outside this (cgo) package can name them.
const (
	StatePermanent uint32 = 1
	StateVolatile  uint32 = 2
	StateSaveState uint32 = 3
)

// StateName returns libtpms' blob name for a state type, or "" if unknown.
func StateName(t uint32) string {
	switch t {
	case StatePermanent:
		return BlobPermanent
	case StateVolatile:
		return BlobVolatile
	case StateSaveState:
		return BlobSaveState
	}
	return ""
}

func libtpmsStateType(t uint32) C.enum_TPMLIB_StateType {
	switch t {
	case StatePermanent:
		return C.TPMLIB_STATE_PERMANENT
	case StateVolatile:
		return C.TPMLIB_STATE_VOLATILE
	case StateSaveState:
		return C.TPMLIB_STATE_SAVE_STATE
	}
	return 0
}

// InitDeleteVolatile is swtpm's PTM_INIT_FLAG_DELETE_VOLATILE.
const InitDeleteVolatile uint32 = 1

// Result codes (TPM 1.2 style, as swtpm's control channel returns them).
const (
	RCSuccess      uint32 = 0
	RCBadParameter uint32 = 3
	RCFail         uint32 = 9
	RCBadOrdinal   uint32 = 10
	RCKeyNotFound  uint32 = 13
	RCSize         uint32 = 23
	RCIOError      uint32 = 31
	RCBadLocality  uint32 = 61
)

const (
	rcRetry = C.uint32_t(C.TPM_RETRY)
	rcFail  = C.uint32_t(C.TPM_FAIL)
	rcSize  = C.uint32_t(C.TPM_SIZE)
)

// TPM 2.0 response codes swtpm puts in its own error responses.
const (
	tpm2RCInsufficient = C.CVTPM_RC_INSUFFICIENT
	tpm2RCFailure      = C.CVTPM_RC_FAILURE
)

// active is the process's one TPM, used by the C callbacks.
var (
	activeMu sync.Mutex
	active   *TPM
)

// TPM is the process's libtpms TPM 2.0. All methods are safe for concurrent
// use. Its running flag, locality and response buffer are C globals under
// the engine's C lock (stream.c), since a stream loop reads them too.
type TPM struct {
	store Storage
	log   *slog.Logger
}

// lock and unlock take the engine's lock; every libtpms call holds it.
func (t *TPM) lock()   { C.cvtpm_lock() }
func (t *TPM) unlock() { C.cvtpm_unlock() }

func (t *TPM) running() bool { return C.cvtpm_running != 0 }

// ErrInUse is returned by New when the process already has a TPM.
var ErrInUse = errors.New("engine: this process already runs a TPM (libtpms keeps global state)")

// New creates the process's TPM on store. The TPM starts stopped; Init starts it.
func New(store Storage, logger *slog.Logger) (*TPM, error) {
	if store == nil {
		return nil, errors.New("engine: nil Storage")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	activeMu.Lock()
	defer activeMu.Unlock()
	if active != nil {
		return nil, ErrInUse
	}
	if rc := C.cvtpm_register_callbacks(); rc != 0 {
		return nil, fmt.Errorf("engine: registering libtpms callbacks: TPM result 0x%x", uint32(rc))
	}
	if rc := C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2); rc != 0 {
		return nil, fmt.Errorf("engine: libtpms has no TPM 2.0: TPM result 0x%x", uint32(rc))
	}
	t := &TPM{store: store, log: logger}
	C.cvtpm_lock()
	C.cvtpm_locality, C.cvtpm_running = 0, 0
	C.cvtpm_unlock()
	active = t
	return t, nil
}

// Close stops the TPM and lets the process create another one.
func (t *TPM) Close() {
	t.lock()
	t.terminate()
	C.cvtpm_free_response_buffer()
	t.unlock()
	activeMu.Lock()
	if active == t {
		active = nil
	}
	activeMu.Unlock()
}

func (t *TPM) terminate() {
	C.TPMLIB_Terminate()
	C.cvtpm_running = 0
}

// Init (re)starts the TPM from its stored state, as swtpm's CMD_INIT:
// libtpms is terminated first; flags may hold InitDeleteVolatile.
// It returns a TPM result code.
func (t *TPM) Init(flags uint32) uint32 {
	t.lock()
	defer t.unlock()
	t.terminate()
	if rc := C.TPMLIB_ChooseTPMVersion(C.TPMLIB_TPM_VERSION_2); rc != 0 {
		t.log.Error("libtpms: choosing TPM 2.0 failed", "rc", uint32(rc))
		return uint32(rc)
	}
	if rc := C.TPMLIB_MainInit(); rc != 0 {
		t.log.Error("libtpms: could not initialize the TPM", "rc", uint32(rc))
		return uint32(rc)
	}
	if flags&InitDeleteVolatile != 0 {
		if err := t.store.Delete(BlobVolatile); err != nil {
			t.log.Error("could not delete the volatile state of the TPM", "err", err)
			C.TPMLIB_Terminate()
			return RCFail
		}
	}
	C.cvtpm_running = 1
	// Starting libtpms allocates and frees far more than it keeps; hand
	// the freed pages back, since a TPM mostly idles between commands.
	C.malloc_trim(0)
	return RCSuccess
}

// Stop terminates libtpms; the TPM answers commands with an error until Init.
func (t *TPM) Stop() {
	t.lock()
	t.terminate()
	t.unlock()
}

// Running reports whether the TPM has been initialized and not stopped.
func (t *TPM) Running() bool {
	t.lock()
	defer t.unlock()
	return t.running()
}

// Locality returns the locality commands run at.
func (t *TPM) Locality() uint8 {
	t.lock()
	defer t.unlock()
	return uint8(C.cvtpm_locality)
}

// SetLocality sets the locality for the following commands (0..4).
func (t *TPM) SetLocality(loc uint8) uint32 {
	if loc > 4 {
		return RCBadLocality
	}
	t.lock()
	C.cvtpm_locality = C.TPM_MODIFIER_INDICATOR(loc)
	t.unlock()
	return RCSuccess
}

// Execute runs one TPM 2.0 command at the current locality and appends the
// response to dst. A stopped TPM answers TPM_RC_FAILURE, a command shorter
// than a header TPM_RC_INSUFFICIENT, exactly as swtpm does.
func (t *TPM) Execute(dst, cmd []byte) []byte {
	return t.execute(dst, cmd, -1)
}

// ExecuteAt sets the locality (as the TPM_SEND_COMMAND prefix does, it
// stays set) and runs cmd. A locality above 4 gets TPM_RC_LOCALITY.
func (t *TPM) ExecuteAt(dst, cmd []byte, locality uint8) []byte {
	if locality > 4 {
		return AppendErrorResponse(dst, C.CVTPM_RC_LOCALITY)
	}
	return t.execute(dst, cmd, int(locality))
}

// execute is one C call: the lock, libtpms and the copy into dst's spare
// capacity (or, for a response that does not fit, into a C copy taken
// here).
func (t *TPM) execute(dst, cmd []byte, loc int) []byte {
	if cap(dst)-len(dst) < 10 {
		dst = slices.Grow(dst, 4096)
	}
	var rc C.uint32_t
	var cmdp, big *C.uchar
	if len(cmd) > 0 {
		cmdp = (*C.uchar)(unsafe.Pointer(&cmd[0]))
	}
	room := dst[len(dst):cap(dst)]
	n := int(C.cvtpm_execute(C.int(loc), cmdp, C.uint32_t(len(cmd)), (*C.uchar)(unsafe.Pointer(&room[0])), C.uint32_t(len(room)), &big, &rc))
	if rc != 0 {
		processFailed(t.log, uint32(rc))
	}
	if big != nil {
		dst = append(dst, unsafe.Slice((*byte)(unsafe.Pointer(big)), n)...)
		C.free(unsafe.Pointer(big))
		return dst
	}
	return dst[:len(dst)+n]
}

// AppendErrorResponse appends a 10-byte TPM 2.0 error response with code rc.
func AppendErrorResponse(dst []byte, rc uint32) []byte {
	return append(dst, 0x80, 0x01, 0, 0, 0, 10, byte(rc>>24), byte(rc>>16), byte(rc>>8), byte(rc))
}

// running-only wrapper: swtpm answers TPM_BAD_ORDINAL while stopped.
func (t *TPM) whileRunning(f func() uint32) uint32 {
	t.lock()
	defer t.unlock()
	if !t.running() {
		return RCBadOrdinal
	}
	return f()
}

// Established returns the TPM-established flag.
func (t *TPM) Established() (bool, uint32) {
	var bit C.TPM_BOOL
	rc := t.whileRunning(func() uint32 { return uint32(C.TPM_IO_TpmEstablished_Get(&bit)) })
	return bit != 0, rc
}

// ResetEstablished clears the TPM-established flag, acting at locality loc
// (which must be 3 or 4 for libtpms to allow it); the current locality is kept.
func (t *TPM) ResetEstablished(loc uint8) uint32 {
	return t.whileRunning(func() uint32 {
		if loc > 4 {
			return RCBadLocality
		}
		cur := C.cvtpm_locality
		C.cvtpm_locality = C.TPM_MODIFIER_INDICATOR(loc)
		rc := uint32(C.TPM_IO_TpmEstablished_Reset())
		C.cvtpm_locality = cur
		return rc
	})
}

// HashStart, HashData and HashEnd are the TPM's _TPM_Hash_* indications.
func (t *TPM) HashStart() uint32 {
	return t.whileRunning(func() uint32 { return uint32(C.TPM_IO_Hash_Start()) })
}

// HashData feeds data to the hash sequence HashStart began.
func (t *TPM) HashData(data []byte) uint32 {
	return t.whileRunning(func() uint32 {
		if len(data) == 0 {
			return uint32(C.TPM_IO_Hash_Data(nil, 0))
		}
		return uint32(C.TPM_IO_Hash_Data((*C.uchar)(unsafe.Pointer(&data[0])), C.uint32_t(len(data))))
	})
}

// HashEnd ends the hash sequence.
func (t *TPM) HashEnd() uint32 {
	return t.whileRunning(func() uint32 { return uint32(C.TPM_IO_Hash_End()) })
}

// Cancel asks libtpms to cancel the running command. Commands run
// synchronously under the engine mutex, so, as in swtpm, there is normally
// nothing to cancel.
func (t *TPM) Cancel() uint32 {
	return t.whileRunning(func() uint32 { return uint32(C.TPMLIB_CancelCommand()) })
}

// StoreVolatile writes the volatile state to storage (swtpm's CMD_STORE_VOLATILE).
func (t *TPM) StoreVolatile() uint32 {
	return t.whileRunning(t.storeVolatile)
}

func (t *TPM) storeVolatile() uint32 {
	var buf *C.uchar
	var n C.uint32_t
	if rc := C.TPMLIB_VolatileAll_Store(&buf, &n); rc != 0 {
		return uint32(rc)
	}
	err := t.store.Save(BlobVolatile, unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(n)))
	C.free(unsafe.Pointer(buf))
	if err != nil {
		t.log.Error("saving the volatile state failed", "err", err)
		return RCFail
	}
	return RCSuccess
}

// RCRetry is TPM_RETRY: GetState has no such blob (as swtpm answers).
const RCRetry = uint32(C.TPM_RETRY)

// ErrRunning is returned for operations swtpm refuses while the TPM runs.
var ErrRunning = errors.New("engine: not allowed while the TPM is running")

// SetBufferSize sets libtpms' I/O buffer size (0 only queries) and returns
// the size in use and the supported range. Changing it needs a stopped TPM.
func (t *TPM) SetBufferSize(wanted uint32) (size, minSize, maxSize uint32, err error) {
	t.lock()
	defer t.unlock()
	if wanted > 0 && t.running() {
		return 0, 0, 0, ErrRunning
	}
	var lo, hi C.uint32_t
	s := C.TPMLIB_SetBufferSize(C.uint32_t(wanted), &lo, &hi)
	return uint32(s), uint32(lo), uint32(hi), nil
}

// MaxCommandSize is the largest TPM command libtpms accepts.
func (t *TPM) MaxCommandSize() int {
	t.lock()
	defer t.unlock()
	var v C.int
	if rc := C.TPMLIB_GetTPMProperty(C.TPMPROP_TPM_BUFFER_MAX, &v); rc != 0 || v <= 0 {
		return 4096
	}
	return int(v)
}

// Info returns libtpms' JSON info for flags (1 specification, 2
// attributes, 4 features; ORed).
func (t *TPM) Info(flags uint64) (string, error) {
	t.lock()
	defer t.unlock()
	p := C.TPMLIB_GetInfo(C.enum_TPMLIB_InfoFlags(flags))
	if p == nil {
		return "", errors.New("engine: libtpms returned no info")
	}
	defer C.free(unsafe.Pointer(p))
	return C.GoString(p), nil
}

// GetState returns a plain libtpms state blob, as swtpm's CMD_GET_STATEBLOB
// gets it: the volatile state from libtpms (nothing is written), the others
// from storage.
func (t *TPM) GetState(st uint32) ([]byte, uint32) {
	t.lock()
	defer t.unlock()
	if !t.running() {
		return nil, RCBadOrdinal
	}
	name := StateName(st)
	if name == "" {
		return nil, RCBadParameter
	}
	if st == StateVolatile {
		// Taken from libtpms directly: storing it (as swtpm does, then
		// deleting it again) would change the state store for a read.
		var buf *C.uchar
		var n C.uint32_t
		if rc := C.TPMLIB_VolatileAll_Store(&buf, &n); rc != 0 {
			return nil, uint32(rc)
		}
		b := C.GoBytes(unsafe.Pointer(buf), C.int(n))
		C.free(unsafe.Pointer(buf))
		return b, RCSuccess
	}
	b, err := t.store.Load(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// swtpm answers TPM_RETRY when there is no such blob.
			return nil, uint32(C.TPM_RETRY)
		}
		t.log.Error("loading a state blob failed", "blob", name, "err", err)
		return nil, RCFail
	}
	return b, RCSuccess
}

// SetState hands a plain libtpms state blob to libtpms for the next Init
// (swtpm's CMD_SET_STATEBLOB); an empty blob clears a pending one. The TPM
// must be stopped.
func (t *TPM) SetState(st uint32, blob []byte) uint32 {
	t.lock()
	defer t.unlock()
	if t.running() {
		return RCBadOrdinal
	}
	lt := libtpmsStateType(st)
	if lt == 0 {
		return RCBadParameter
	}
	name := StateName(st)
	if len(blob) == 0 {
		if err := t.store.Delete(name); err != nil {
			t.log.Error("deleting a state blob failed", "blob", name, "err", err)
			return RCFail
		}
		return uint32(C.TPMLIB_SetState(lt, nil, 0))
	}
	// libtpms checks the blob first; only a blob it accepted is stored
	// (so it survives a restart before the next Init). A refused blob
	// leaves the stored state as it was.
	if rc := uint32(C.TPMLIB_SetState(lt, (*C.uchar)(unsafe.Pointer(&blob[0])), C.uint32_t(len(blob)))); rc != 0 {
		t.log.Warn("libtpms refused a state blob; the stored state is unchanged", "blob", name, "rc", rc)
		return rc
	}
	if err := t.store.Save(name, blob); err != nil {
		t.log.Error("saving a state blob failed", "blob", name, "err", err)
		C.TPMLIB_SetState(lt, nil, 0)
		return RCFail
	}
	return RCSuccess
}
