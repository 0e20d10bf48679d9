// Package bench compares cvtpm with swtpm from one Go client in one run.
//
// It holds only benchmarks (see bench_test.go): both servers are started with
// the same command line, driven alternately in blocks so that the machine's
// speed drift hits both equally, and every figure is reported for each server
// together with the cvtpm/swtpm ratio. `make bench` runs it; README.md holds the
// latest measured figures.
package bench
