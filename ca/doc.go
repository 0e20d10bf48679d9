// Package ca is the third-party EK certificate authority: it appraises CSV
// evidence that binds an EK to a vTPM backend running in a TEE and only then
// issues a TCG EK Credential Profile certificate.
//
// Not implemented yet: see issue 5.
package ca
