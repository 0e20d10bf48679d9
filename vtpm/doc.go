// Package vtpm is the backend: a libtpms TPM 2.0 engine (vtpm/engine), its
// sealed state store (vtpm/statestore), the swtpm-compatible control, data
// and mssim protocol servers (vtpm/swtpmproto), TPM calls as messages
// between processes (vtpm/tpmrpc) and the instance supervisor of the vTPM
// CVM (vtpm/backend).
package vtpm
