// Package guestkit is the in-guest side of cvtpm: the end-to-end attested
// channel client that exposes a backend instance as a local TPM, and the
// attester that gathers evidence.
//
// Not implemented yet: see issues 4 and 6.
package guestkit
