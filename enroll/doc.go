// Package enroll creates a vTPM instance's EKs, binds them to CSV evidence,
// obtains their certificates from the CA and writes them into TPM NV.
//
// Not implemented yet: see issue 5.
package enroll
