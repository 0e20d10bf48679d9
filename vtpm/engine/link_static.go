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

// As in the fully static build (link_fullstatic.go), libcrypto reads no
// openssl.cnf: the TPM's algorithms are the built-in default provider in
// every build, and a configured engine or provider that opens a device or
// a socket cannot run (nor be killed by the drop-in's seccomp filter, as
// `cvtpm socket` in the full binary was: TestReviewS31FullBinaryOpenSSLConfigUnderFilter).

/*
#cgo LDFLAGS: -Wl,-Bstatic -ltpms -lcrypto -Wl,-Bdynamic -ldl -lpthread
#include <openssl/crypto.h>

__attribute__((constructor)) static void cvtpm_openssl_no_config(void) {
	OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, NULL);
}
*/
import "C"
