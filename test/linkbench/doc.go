// Package linkbench measures what the attested path costs (issue 13): a
// small command and an ECC quote through guest proxy -> frontend relay ->
// backend -> worker, beside a direct cvtpm socket and swtpm in the same
// run, with a breakdown per hop, the path of a Go agent that holds the
// link in its own process (guestkit.Proxy.TPM), QEMU's path through the
// frontend, the latency and CPU of commands sent in bursts after a pause
// (BenchmarkAttestedBursts: how guests use a TPM, and where each Go
// process's sysmon wakes up), and the memory of many idle instances in one
// backend.
//
// CVTPM_BENCH_PIN=same runs the bench process and everything it starts
// on one CPU (pin_test.go), as test/bench runs its client and servers;
// unset or off, nothing is pinned. `make bench` runs the latencies both
// ways and the memory benchmark unpinned.
package linkbench
