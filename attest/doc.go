// Package attest holds evidence formats and their verification: csv (HYGON
// CSV reports, verifier, simulator, guest device), freshreport (the vendor
// TPM command that fetches a CSV report bound to a verifier's nonce and the
// EK), verifier (the combined TPM + CSV verifier with its Rego policy) and
// ear (the signed result token).
package attest
