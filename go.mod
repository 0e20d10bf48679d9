module cvtpm

go 1.26.8

require (
	github.com/emmansun/gmsm v0.44.1 // indirect
	github.com/google/go-attestation v0.6.4 // indirect
	github.com/google/go-tpm v0.9.8 // indirect
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/sys v0.49.0 // indirect
)
