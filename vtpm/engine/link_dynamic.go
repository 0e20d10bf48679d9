//go:build libtpms_dynamic

package engine

// With -tags libtpms_dynamic, libtpms and libcrypto are the system's shared
// libraries (see link_static.go for why that is not the default).

/*
#cgo pkg-config: libtpms
*/
import "C"
