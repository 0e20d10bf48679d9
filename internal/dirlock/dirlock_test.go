package dirlock

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A second holder is refused at once with the first one's PID; after
// Release the directory can be taken again. flock locks belong to open
// file descriptions, so a second Take in this process conflicts too.
func TestTake(t *testing.T) {
	dir := t.TempDir()
	l, err := Take(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = Take(dir)
	var inUse *InUseError
	if !errors.As(err, &inUse) || inUse.Holder != fmt.Sprintf("PID %d", os.Getpid()) {
		t.Fatalf("second Take: %v", err)
	}
	if !strings.Contains(err.Error(), dir+" is in use by PID ") {
		t.Fatalf("message: %q", err)
	}
	// flock(1) from another process sees the lock held too.
	if flock, err := exec.LookPath("flock"); err == nil {
		if out, err := exec.Command(flock, "-n", dir+"/"+FileName, "true").CombinedOutput(); err == nil {
			t.Fatalf("another process took the lock: %s", out)
		}
	}
	if err := l.Release(); err != nil {
		t.Fatal(err)
	}
	l2, err := Take(dir)
	if err != nil {
		t.Fatalf("Take after Release: %v", err)
	}
	l2.Release()
	if _, err := Take(dir + "/missing/sub"); err == nil {
		t.Fatal("Take of a missing directory")
	}
}

// A .lock planted as a symlink is refused, and its target left alone.
func TestTakeRefusesSymlink(t *testing.T) {
	dir, victim := t.TempDir(), filepath.Join(t.TempDir(), "victim")
	os.WriteFile(victim, []byte("keep me"), 0o600)
	if err := os.Symlink(victim, filepath.Join(dir, FileName)); err != nil {
		t.Fatal(err)
	}
	if l, err := Take(dir); err == nil {
		l.Release()
		t.Fatal("Take followed a symlinked lock file")
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Fatalf("the symlink's target was written: %q", b)
	}
}

// A .lock that is a hard link to another file is refused, and that file
// left alone.
func TestTakeRefusesHardLink(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "acl.json")
	os.WriteFile(victim, []byte("keep me"), 0o600)
	if err := os.Link(victim, filepath.Join(dir, FileName)); err != nil {
		t.Fatal(err)
	}
	if l, err := Take(dir); err == nil {
		l.Release()
		t.Fatal("Take used a hard-linked lock file")
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Fatalf("the linked file was written: %q", b)
	}
}
