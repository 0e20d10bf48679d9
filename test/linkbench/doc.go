// Package linkbench measures what the attested path costs (issue 4): a
// small command and an ECC quote through guest proxy -> frontend relay ->
// backend -> worker, beside a direct cvtpm socket and swtpm in the same
// run, and the memory of many idle instances in one backend. Run it with
// `make bench`.
package linkbench
