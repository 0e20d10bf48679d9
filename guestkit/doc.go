// Package guestkit is the in-guest side of cvtpm: the end-to-end attested
// channel client that exposes a backend instance as a local TPM, and the
// attester that gathers evidence.
//
// The attester (evidence for the combined verifier) is issue 6.
package guestkit
