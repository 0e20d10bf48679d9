package engine

import (
	"crypto/sha256"

	"github.com/google/go-tpm/tpm2"
)

func sha256Of(b []byte) []byte { s := sha256.Sum256(b); return s[:] }

// recorder captures the command bytes go-tpm would send.
type recorder struct{ cmd []byte }

func (r *recorder) Send(cmd []byte) ([]byte, error) {
	r.cmd = append([]byte(nil), cmd...)
	return nil, errRecorded
}

type recordedErr struct{}

func (recordedErr) Error() string { return "recorded" }

var errRecorded error = recordedErr{}

// commandBytes marshals a go-tpm command without running it.
func commandBytes[C tpm2.Command[R, *R], R any](c C) ([]byte, error) {
	r := &recorder{}
	c.Execute(r)
	return r.cmd, nil
}
