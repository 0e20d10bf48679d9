package dirlock

import (
	"os"
	"path/filepath"
	"testing"
)

// Review 3: the host owns the backend's disk (--dir and every instance
// directory in it). A .lock it plants as a symlink is followed: the
// daemon (root in the CVM) opens the target read-write, creating it if
// missing, truncates it and writes its PID there: a file outside the
// directory, e.g. one on the CVM's own file system, is clobbered.
func TestReview3LockFollowsSymlink(t *testing.T) {
	dir, other := t.TempDir(), t.TempDir()
	victim := filepath.Join(other, "acl.json")
	if err := os.WriteFile(victim, []byte(`{"precious": true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, FileName)); err != nil {
		t.Fatal(err)
	}
	l, err := Take(dir)
	if err == nil {
		defer l.Release()
	}
	if b, _ := os.ReadFile(victim); string(b) != `{"precious": true}` {
		t.Errorf("Take(%s) with .lock -> %s rewrote the target: now %q", dir, victim, b)
	}

	// A dangling symlink makes it create a file where the host says.
	dir2 := t.TempDir()
	created := filepath.Join(other, "created-by-the-host")
	if err := os.Symlink(created, filepath.Join(dir2, FileName)); err != nil {
		t.Fatal(err)
	}
	if l, err := Take(dir2); err == nil {
		defer l.Release()
	}
	if _, err := os.Lstat(created); err == nil {
		t.Errorf("Take(%s) with a dangling .lock symlink created %s", dir2, created)
	}
}
