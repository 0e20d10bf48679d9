// Package vtpm is the backend: a libtpms TPM 2.0 engine (vtpm/engine), its
// sealed state store (vtpm/statestore) and the swtpm-compatible control,
// data and mssim protocol servers (vtpm/swtpmproto).
package vtpm
