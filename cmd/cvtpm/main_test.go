package main

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestPlainError(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("CA challenge: %w", status.Error(codes.Unavailable, `connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:1: connect: connection refused"`)),
			"CA challenge: unreachable (dial tcp 127.0.0.1:1: connect: connection refused): is the service running at that address?"},
		{fmt.Errorf("enroll: %w", status.Error(codes.PermissionDenied, "measurement-not-approved: image ab12")),
			"enroll: measurement-not-approved: image ab12 (refused)"},
		{errors.New("--policy: open x: no such file or directory"), "--policy: open x: no such file or directory"},
	} {
		if got := plainError(tc.err); got != tc.want {
			t.Errorf("plainError(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}
