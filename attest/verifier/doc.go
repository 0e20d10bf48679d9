// Package verifier is cvtpm's combined verifier: one call answers "is this
// workload VM what it claims, with a vTPM that truly lives in a TEE?".
//
// Evidence (api/attest.Evidence) has two halves that must answer the same
// single-use nonce:
//
//   - The vTPM: an EK certificate from the cvtpm EK CA (which certified the
//     EK only on CSV evidence from the backend), an AK certificate from the
//     same CA naming that EK (issued after a credential activation proved
//     the AK lives beside the EK), and go-tpm-tools' Attestation: quotes of
//     the PCRs by the AK over the nonce, and the TCG event log that must
//     replay to the quoted PCRs.
//   - The platform: a fresh CSV report from the backend hosting the vTPM,
//     whose report_data commits to the nonce, the EK public area and the
//     instance id (attest/freshreport.ReportData), made on the same chip and
//     with the same launch measurement that the EK certificate's CSV claims
//     record.
//
// The facts are appraised by a Rego policy (a default is built in) against
// reference values, and the result is an EAR (EAT Attestation Result) token
// signed by the verifier, with one submodule per half ("cvtpm-vtpm" and
// "csv-platform"), each with a status (affirming, warning, contraindicated)
// and the reasons behind it.
package verifier
