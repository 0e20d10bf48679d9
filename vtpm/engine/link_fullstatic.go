//go:build fullstatic && !libtpms_dynamic

package engine

// The per-TPM binaries (cvtpm-worker, cvtpm-swtpm) are built with
// -tags fullstatic (see the Makefile): libtpms, libcrypto and the C
// library all linked in, with no dynamic loader at all. The loader's work
// at every start (about 0.4 ms here) and its private pages in every
// process (about 0.1 MiB per idle instance at density) go; a glibc
// security update then needs a rebuild, as libcrypto's already did.
//
// A static program cannot load OpenSSL's provider or engine modules
// (dlopen in a static glibc program needs the same glibc's shared
// objects), so libcrypto is told not to read openssl.cnf at all: the
// TPM's algorithms are libcrypto's built-in default provider, whatever
// configuration the machine carries.

/*
#cgo LDFLAGS: -ltpms -lcrypto -ldl -lpthread
#include <openssl/crypto.h>

__attribute__((constructor)) static void cvtpm_openssl_no_config(void) {
	OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG, NULL);
}
*/
import "C"
