// Package capb holds the EK CA's gRPC API, generated from ca.proto.
package capb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative ca.proto keybroker.proto
