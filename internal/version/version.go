// Package version says which cvtpm a binary is: the commit it was built
// from (stamped by the Go toolchain when built in the git checkout) and the
// Go version.
package version

import (
	"fmt"
	"runtime/debug"
)

// Commit is set at link time by `make build` (-X
// cvtpm/internal/version.Commit=...: git describe --always --dirty), for
// environments that build with -buildvcs=false.
var Commit string

// String is e.g. "cvtpm 036f7c7a1b2c (2026-12-01T02:17:00Z), go1.26.0", with
// ", modified" when the checkout had uncommitted changes, and "commit
// unknown" for a build outside git.
func String(program string) string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return program + " (no build information)"
	}
	rev, when, modified := "", "", false
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			when = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	out := program
	if Commit != "" {
		return fmt.Sprintf("%s commit %s, %s", program, Commit, info.GoVersion)
	}
	if rev == "" {
		out += " commit unknown"
	} else {
		out += " commit " + rev[:min(12, len(rev))]
		if when != "" {
			out += " (" + when + ")"
		}
		if modified {
			out += ", modified"
		}
	}
	return fmt.Sprintf("%s, %s", out, info.GoVersion)
}
