package backend

// Third adversarial review, finding: a taken-over worker, with one
// symlink the host planted on its disk, makes the supervisor (root, every
// capability, the whole file system) truncate and write a file outside the
// state directory. Create makes the instance's directory and then writes
// its incarnation (and binding.json) with os.WriteFile, which follows a
// symlink. A worker cannot make a symlink (symlinkat is not on its list),
// but renameat2 is, and it sees the whole state root: it moves a symlink
// that the host left anywhere in the state directory (".stash/l0", not an
// instance id, so the backend ignores it) into the new instance's directory
// between the supervisor's mkdir and its open. The host alone, editing the
// disk while the CVM is off, cannot: the directory does not exist yet.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// review3SymlinkRacer runs in the taken-over worker once the test says so
// (ctl/go): it moves the host's symlinks ctl/../.stash/lN, one by one, to
// <state root>/<REVIEW3_TARGET_ID>/incarnation, as fast as it can, with
// RENAME_NOREPLACE: a rename that succeeds came before the supervisor's
// open, which then follows the symlink; one that comes too late fails with
// EEXIST and keeps the symlink for the next try (renameat2, fstatat: both
// allowed).
func review3SymlinkRacer(ctl string) {
	for {
		if _, err := os.Stat(filepath.Join(ctl, "go")); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	runtime.LockOSThread()
	fdcwd := int64(unix.AT_FDCWD)
	atFDCWD := uintptr(fdcwd)
	root := filepath.Dir(ctl)
	dst, _ := unix.BytePtrFromString(filepath.Join(root, os.Getenv("REVIEW3_TARGET_ID"), "incarnation"))
	for n := 0; n < 1000; n++ {
		src, _ := unix.BytePtrFromString(filepath.Join(root, ".stash", fmt.Sprintf("l%d", n)))
		for {
			_, _, e := unix.RawSyscall6(unix.SYS_RENAMEAT2, atFDCWD, uintptr(unsafe.Pointer(src)), atFDCWD, uintptr(unsafe.Pointer(dst)), unix.RENAME_NOREPLACE, 0)
			if e == 0 {
				break
			}
		}
	}
}

func TestReview3WorkerMovesHostSymlinkIntoNewInstance(t *testing.T) {
	dir := t.TempDir()
	ctl := filepath.Join(dir, ".review3")
	stash := filepath.Join(dir, ".stash")
	for _, d := range []string{ctl, stash} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	// A file outside the state directory, which only root may write (a
	// stand-in for /etc/..., the backend's configuration, its ACL).
	outside := filepath.Join(t.TempDir(), "root-only.conf")
	const orig = "outside the state directory: no worker may touch this\n"
	if err := os.WriteFile(outside, []byte(orig), 0o600); err != nil {
		t.Fatal(err)
	}
	// The host's part: symlinks on its disk, in the state directory.
	for n := range 1000 {
		if err := os.Symlink(outside, filepath.Join(stash, fmt.Sprintf("l%d", n))); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("REVIEW3_MODE", "symlink")
	t.Setenv("REVIEW3_CTL", ctl)
	t.Setenv("REVIEW3_EVIL_ID", "vm1")
	t.Setenv("REVIEW3_TARGET_ID", "vm9")
	s := testBinarySupervisor(t, Config{Dir: dir, CallTimeout: 5 * time.Second})
	ctx := context.Background()
	if _, err := s.Create(ctx, "vm1", CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ctl, "go"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	// The administrator creates (and deletes, and creates) vm9, bound to
	// its workload.
	_, root := workloadSim(t, 0x77, 0x7)
	binding := bindingJSON(t, root, "boot", 0x77)
	for try := 1; try <= 300; try++ {
		_, cerr := s.Create(ctx, "vm9", CreateOptions{Binding: binding})
		b, _ := os.ReadFile(outside)
		if string(b) != orig {
			t.Fatalf("try %d: the supervisor wrote through a symlink that vm1's worker moved into vm9's new directory: %s (outside the state root) now holds %q (create: %v)", try, outside, b, cerr)
		}
		s.Delete(ctx, "vm9")
	}
	left, _ := os.ReadDir(stash)
	t.Logf("the file outside stayed intact over 300 creates (%d symlinks left unused)", len(left))
}
