//go:build !libtpms_dynamic && !fullstatic

package engine

// libtpms and OpenSSL's libcrypto are linked statically by default (Debian's
// libtpms-dev and libssl-dev ship the archives). In a position-dependent Go
// executable their code and data then need no run-time relocation: every
// page of them stays a clean, shared page of the binary file, where the
// shared libraries cost each process about 0.4 MiB of private relocated
// pages and the dynamic loader's work at every start. That is most of what
// separates an idle cvtpm-worker and cvtpm-swtpm from swtpm. The price: a
// libcrypto security update needs a rebuild of cvtpm, as for any statically
// linked program; inside a measured confidential VM image that is the usual
// case anyway. Build with -tags libtpms_dynamic to link the shared
// libraries instead.

/*
#cgo LDFLAGS: -Wl,-Bstatic -ltpms -lcrypto -Wl,-Bdynamic -ldl -lpthread
*/
import "C"
