// Package attest holds evidence formats and their verification. Subpackage
// csv handles HYGON CSV evidence; the combined TPM-plus-CSV verifier is
// tracked in issue 6.
package attest
