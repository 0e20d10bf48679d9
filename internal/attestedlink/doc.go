// Package attestedlink is the encrypted, attested channel between a vTPM
// backend (inside a CSV confidential VM) and its clients: the host's
// frontend and, end to end through the host's relay, guestkit inside a
// workload VM.
//
// A session is TLS 1.3 (crypto/tls) with client certificates. Right after
// the handshake the client sends a fresh 32-byte nonce; the backend answers
// with a CSV attestation report whose report_data is ReportData(exporter,
// nonce), where exporter is the session's TLS exporter value for the label
// "EXPORTER-cvtpm-attested-link". The client verifies the report's chain
// to its trusted HYGON roots, the report_data and the appraisal policy
// (measurement, NODBG, ...) before it sends a single TPM command. Because
// the exporter is unique to the TLS session, the report cannot be relayed
// into another session: whoever holds the session keys is the attested
// backend. The server's TLS certificate therefore needs no PKI of its own.
//
// After attestation, frames carry calls (vtpm/tpmrpc messages) to a named
// vTPM instance. Every frame has a per-direction sequence number on top of
// TLS's own record protection; any altered, dropped, replayed, reordered or
// truncated byte ends the session with an error before a command reaches
// the TPM or a response reaches the caller.
//
// Frame (inside TLS): len u32 | version u8 | type u8 | seq u64 |
// instance length u16 | instance | payload. len counts everything after
// itself; all integers are big-endian.
package attestedlink
