package engine

/*
#include <stdint.h>
#include <stdlib.h>
*/
import "C"

import (
	"errors"
	"io/fs"
	"unsafe"
)

// These functions run inside TPMLIB_* calls, which the engine only makes
// while holding its mutex, so they may use the active TPM without locking.

//export cvtpmGoLoad
func cvtpmGoLoad(data **C.uchar, length *C.uint32_t, name *C.char) C.uint32_t {
	t := active
	n := C.GoString(name)
	b, err := t.store.Load(n)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// libtpms treats TPM_RETRY as "no such blob yet": a fresh TPM.
			return rcRetry
		}
		t.log.Error("loading TPM state blob failed", "blob", n, "err", err)
		return rcFail
	}
	// libtpms releases the buffer with free(), so it must come from malloc.
	p := C.malloc(C.size_t(len(b) + 1))
	if p == nil {
		return rcSize
	}
	copy(unsafe.Slice((*byte)(p), len(b)), b)
	*data = (*C.uchar)(p)
	*length = C.uint32_t(len(b))
	return 0
}

//export cvtpmGoStore
func cvtpmGoStore(data *C.uchar, length C.uint32_t, name *C.char) C.uint32_t {
	t := active
	n := C.GoString(name)
	// Storage.Save does not keep the slice (see Storage): no Go copy of
	// every blob libtpms writes.
	b := unsafe.Slice((*byte)(unsafe.Pointer(data)), int(length))
	if err := t.store.Save(n, b); err != nil {
		t.log.Error("saving TPM state blob failed", "blob", n, "err", err)
		return rcFail
	}
	return 0
}

//export cvtpmGoDelete
func cvtpmGoDelete(name *C.char, mustExist C.uchar) C.uint32_t {
	t := active
	n := C.GoString(name)
	if err := t.store.Delete(n); err != nil {
		t.log.Error("deleting TPM state blob failed", "blob", n, "err", err)
		return rcFail
	}
	return 0
}
