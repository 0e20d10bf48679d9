// Package dirlock is the exclusive lock a process takes on the directory
// it owns (a TPM's state, a CA's database, a backend's instances), so that
// a second process given the same directory stops at once and says which
// process holds it, instead of sharing the files or waiting.
package dirlock

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// FileName is the lock file in the directory; it holds the holder's PID.
const FileName = ".lock"

// InUseError says that another process holds the directory.
type InUseError struct {
	Dir    string
	Holder string // "PID n", or "another process" when it wrote none
}

func (e *InUseError) Error() string { return fmt.Sprintf("%s is in use by %s", e.Dir, e.Holder) }

// Lock is a held directory lock.
type Lock struct{ fd int }

// Take locks dir without waiting and writes this process's PID in the
// lock file. The lock lasts until Release or the process's exit.
func Take(dir string) (*Lock, error) {
	p := filepath.Join(dir, FileName)
	// Not through a symlink: whoever can write the directory (the host,
	// for a backend's disk) must not make a root daemon truncate and
	// write another file.
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: p, Err: err}
	}
	// Only a lock file of its own: not a hard link the directory's writer
	// made to a file elsewhere on the disk (the PID goes into it below).
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 {
		unix.Close(fd)
		return nil, fmt.Errorf("%s: not a plain lock file (a link or special file placed there?): refused", p)
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			holder := "another process"
			if b, err := os.ReadFile(p); err == nil && len(strings.TrimSpace(string(b))) > 0 {
				holder = "PID " + strings.TrimSpace(string(b))
			}
			return nil, &InUseError{Dir: dir, Holder: holder}
		}
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	// Who holds it, for the next one who asks.
	unix.Ftruncate(fd, 0)
	unix.Pwrite(fd, []byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return &Lock{fd: fd}, nil
}

// Release gives the lock up.
func (l *Lock) Release() error {
	if l == nil || l.fd < 0 {
		return nil
	}
	err := unix.Close(l.fd)
	l.fd = -1
	return err
}
