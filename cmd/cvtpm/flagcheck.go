package main

// Checks of flag values done before a command touches anything, so a bad
// value is one line naming the flag rather than a failure halfway.

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"

	"cvtpm/internal/dirlock"
)

// flagError names the flag a bad value came from.
func flagError(flagName string, err error) error {
	return fmt.Errorf("%s: %w", flagName, err)
}

// checkDir: the value names an existing directory.
func checkDir(flagName, path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return flagError(flagName, err)
	}
	if !st.IsDir() {
		return flagError(flagName, fmt.Errorf("%s is not a directory", path))
	}
	return nil
}

// checkNewFile: the value names a file the command will create, in an
// existing directory, and none is there yet (nothing is overwritten).
func checkNewFile(flagName, path string) error {
	if err := checkDir(flagName, filepath.Dir(path)); err != nil {
		return err
	}
	if _, err := os.Lstat(path); err == nil {
		return flagError(flagName, fmt.Errorf("%s exists: remove it or choose another name", path))
	} else if !errors.Is(err, fs.ErrNotExist) {
		return flagError(flagName, err)
	}
	return nil
}

// checkOutFile: the value names a file the command will write (replacing
// one there), in an existing directory.
func checkOutFile(flagName, path string) error {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		return flagError(flagName, fmt.Errorf("%s is a directory", path))
	}
	return checkDir(flagName, filepath.Dir(path))
}

// checkHTTPURL: the value is an http or https URL with a host.
func checkHTTPURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("%q: want an http:// or https:// URL", s)
	}
	return nil
}

// ownDir makes a daemon's --dir (mode 0700) and takes its lock, so that a
// second daemon on it stops at once saying who holds it; what names the
// directory in that message ("CA directory").
func ownDir(dir, what string) (*dirlock.Lock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, flagError("--dir", err)
	}
	lock, err := dirlock.Take(dir)
	if err != nil {
		return nil, flagError("--dir", fmt.Errorf("%s %w", what, err))
	}
	return lock, nil
}
