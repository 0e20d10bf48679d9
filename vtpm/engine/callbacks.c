// C side of the libtpms callbacks: libtpms wants plain C function pointers,
// which forward to the exported Go functions in callbacks.go.
#include <stdint.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>
#include "_cgo_export.h"

// The locality the next command runs at; set by the Go side under the
// engine mutex just before TPMLIB_Process, read by libtpms through the io
// callback.
TPM_MODIFIER_INDICATOR cvtpm_locality;

static TPM_RESULT cvtpm_nvram_init(void) { return TPM_SUCCESS; }

static TPM_RESULT cvtpm_nvram_loaddata(unsigned char **data, uint32_t *length,
                                       uint32_t tpm_number, const char *name)
{
    (void)tpm_number;
    return cvtpmGoLoad(data, length, (char *)name);
}

static TPM_RESULT cvtpm_nvram_storedata(const unsigned char *data, uint32_t length,
                                        uint32_t tpm_number, const char *name)
{
    (void)tpm_number;
    return cvtpmGoStore((unsigned char *)data, length, (char *)name);
}

static TPM_RESULT cvtpm_nvram_deletename(uint32_t tpm_number, const char *name,
                                         TPM_BOOL mustExist)
{
    (void)tpm_number;
    return cvtpmGoDelete((char *)name, mustExist);
}

static TPM_RESULT cvtpm_io_init(void) { return TPM_SUCCESS; }

static TPM_RESULT cvtpm_io_getlocality(TPM_MODIFIER_INDICATOR *loc, uint32_t tpm_number)
{
    (void)tpm_number;
    *loc = cvtpm_locality;
    return TPM_SUCCESS;
}

static TPM_RESULT cvtpm_io_getphysicalpresence(TPM_BOOL *pp, uint32_t tpm_number)
{
    (void)tpm_number;
    *pp = FALSE;
    return TPM_SUCCESS;
}

TPM_RESULT cvtpm_register_callbacks(void)
{
    static struct libtpms_callbacks cbs = {
        .sizeOfStruct = sizeof(struct libtpms_callbacks),
        .tpm_nvram_init = cvtpm_nvram_init,
        .tpm_nvram_loaddata = cvtpm_nvram_loaddata,
        .tpm_nvram_storedata = cvtpm_nvram_storedata,
        .tpm_nvram_deletename = cvtpm_nvram_deletename,
        .tpm_io_init = cvtpm_io_init,
        .tpm_io_getlocality = cvtpm_io_getlocality,
        .tpm_io_getphysicalpresence = cvtpm_io_getphysicalpresence,
    };
    return TPMLIB_RegisterCallbacks(&cbs);
}
