// Package ca is the third-party EK certificate authority: it appraises CSV
// evidence that binds an EK to a vTPM backend running in a TEE and only then
// issues a TCG EK Credential Profile certificate.
//
// Landed so far: the EK certificate profile (IssueEKCertificate) and the
// CSV claims extension. The service, evidence policy, storage, revocation
// and enrollment are tracked in issue 5.
package ca
