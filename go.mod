module cvtpm

go 1.26.8

require (
	github.com/emmansun/gmsm v0.44.1
	github.com/google/go-tpm v0.9.8
	golang.org/x/sys v0.49.0
)

require (
	github.com/google/go-tpm-tools v0.4.7 // indirect
	golang.org/x/crypto v0.54.0 // indirect
)
