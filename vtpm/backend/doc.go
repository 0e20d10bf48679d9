// Package backend is the instance manager of the vTPM CVM: it runs one
// libtpms worker process per vTPM instance (libtpms holds one TPM per
// process), serialises the commands of each instance, restarts a worker
// that died from its sealed state, and answers the attested link's calls
// (it is an attestedlink.Handler). Workers speak vtpm/tpmrpc over a
// socketpair and get their state-sealing key through a pipe, never on a
// command line or in the environment.
package backend
