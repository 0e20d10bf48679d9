// Package attestpb holds the combined verifier's evidence format and gRPC
// API, generated from evidence.proto.
package attestpb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative evidence.proto
