// Package backendpb holds the vTPM backend's management API, generated from
// backend.proto.
package backendpb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative backend.proto
