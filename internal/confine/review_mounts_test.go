package confine

// Second adversarial review (5901d94): what a worker taken over after
// confine.Worker (ModeKill) still reaches through the file system. Each
// attacker runs in a child started as a worker (workerCommand: --conn-fd
// and --state-root, so early_linux.go's constructor runs), which installs
// the real filter first and then tries the attack with allowed system
// calls only (openat, read, write). Each test fails when the attack
// succeeds.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func init() {
	what := os.Getenv("REVIEW2_CHILD")
	if what == "" {
		return
	}
	if err := Worker(ModeKill); err != nil {
		fmt.Fprintln(os.Stderr, "confine.Worker:", err)
		os.Exit(3)
	}
	if err := review2Attack(what, os.Getenv("REVIEW2_PATH")); err != nil {
		fmt.Fprintln(os.Stderr, what+":", err)
		os.Exit(2)
	}
	os.Exit(0)
}

func review2Attack(what, path string) error {
	switch what {
	case "fifo":
		// The mounts are read-only, but a FIFO is a special file: the
		// kernel takes no write access on its mount (special_file), so
		// O_WRONLY on a read-only, nodev mount succeeds. /run/initctl is
		// such a FIFO on systemd systems (systemd-initctl: runlevel 0 is
		// a power-off of the whole CVM).
		if err := os.WriteFile(filepath.Join(filepath.Dir(path), "regular-outside"), []byte("x"), 0o600); !errors.Is(err, syscall.EROFS) {
			return fmt.Errorf("the mounts are not isolated in this setup (regular write outside: %v)", err)
		}
		fd, err := unix.Open(path, unix.O_WRONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		_, err = unix.Write(fd, []byte("written by a confined worker\n"))
		return err
	case "read":
		// Read-only is not unreadable: uid 0 without capabilities is still
		// the owner of root's 0600 files.
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		fmt.Printf("stole %q\n", strings.TrimSpace(string(b)))
		return nil
	case "write":
		return os.WriteFile(path, []byte("written by a confined worker\n"), 0o600)
	case "dirfd":
		// fd 3: a directory descriptor the process had before the
		// constructor's unshare; it names a mount of the backend's
		// namespace, which nothing made read-only.
		fd, err := unix.Openat(3, filepath.Base(path), unix.O_WRONLY|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		_, err = unix.Write(fd, []byte("written by a confined worker\n"))
		return err
	}
	return fmt.Errorf("unknown case %q", what)
}

func review2Root(t *testing.T) {
	t.Helper()
	reviewSkip(t)
	if os.Geteuid() != 0 {
		t.Skip("the shipped unit runs the backend (and its workers) as root")
	}
}

func review2Run(t *testing.T, cmd *exec.Cmd, what, path string) (string, error) {
	t.Helper()
	cmd.Env = append(os.Environ(), "REVIEW2_CHILD="+what, "REVIEW2_PATH="+path)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// A root worker writes to a FIFO outside its state root, in spite of the
// read-only, nodev mount namespace: on a systemd CVM, /run/initctl
// (prw------- root) takes SysV runlevel requests, a power-off among them.
// Any root daemon that reads a FIFO is reachable the same way.
func TestReview2RootWorkerWritesFIFOOutsideStateRoot(t *testing.T) {
	review2Root(t)
	outer := t.TempDir()
	state := filepath.Join(outer, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(outer, "initctl") // outside the state root
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	// The daemon's end (systemd-initctl holds /run/initctl open).
	rfd, err := unix.Open(fifo, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rfd)
	out, err := review2Run(t, workerCommand(state), "fifo", fifo)
	if err != nil {
		t.Logf("the attack failed: %v: %s", err, out)
		return
	}
	buf := make([]byte, 256)
	n, _ := unix.Read(rfd, buf)
	if n > 0 {
		t.Errorf("a confined root worker (state root %s) wrote %q into the FIFO %s outside its state root; the mount namespace is read-only and nodev, but FIFOs (and any daemon that reads one, e.g. /run/initctl) are not covered", state, buf[:n], fifo)
	}
}

// A root worker reads root's 0600 files anywhere: with the documented
// --migration-key-file (or --master-key-file, or the --csv-sim directory
// with the simulated chip's private keys), that is the migration key the
// README says a worker never holds (or every instance's state key); on any
// setup, /etc/shadow, SSH host keys and whatever else the CVM keeps.
func TestReview2RootWorkerReadsKeyFileOutsideStateRoot(t *testing.T) {
	review2Root(t)
	outer := t.TempDir()
	state := filepath.Join(outer, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	const secret = "6d6967726174696f6e2d6b65792d6f662d7468652d646f6d61696e2d2d2d2d21"
	keyFile := filepath.Join(outer, "migration.key") // as cvtpm backend --migration-key-file
	if err := os.WriteFile(keyFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := review2Run(t, workerCommand(state), "read", keyFile)
	if err != nil {
		t.Logf("the attack failed: %v: %s", err, out)
		return
	}
	if strings.Contains(out, secret) {
		t.Errorf("a confined root worker read the 0600 root-owned key file %s outside its state root: %s", keyFile, strings.TrimSpace(out))
	}
}

// --state-root is followed as a symlink and never checked: a state root
// that is, or resolves to, "/" (or a parent of the system's files) makes
// the constructor lift read-only on everything, and confine.Worker serves.
// The backend's --dir is made absolute (filepath.Abs), not resolved, and
// dirlock only refuses a symlinked .lock: a host that controls a path
// component of --dir (a directory on the disk it provides) decides what
// the workers may write.
func TestReview2SymlinkedStateRootUnconfinesWrites(t *testing.T) {
	review2Root(t)
	outer := t.TempDir()
	state := filepath.Join(outer, "state")
	if err := os.Symlink("/", state); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(outer, "outside") // stands in for /etc/...
	out, err := review2Run(t, workerCommand(state), "write", target)
	if err != nil {
		t.Logf("the attack failed: %v: %s", err, out)
		return
	}
	if b, err := os.ReadFile(target); err == nil {
		t.Errorf("with --state-root %s -> /, a confined root worker wrote %s (%q), outside any state directory: the constructor does not resolve or check the state root", state, target, b)
	}
}

// A worker that does not run as root gets no mount namespace
// (early_linux.go: "a worker of another user has none of root's files to
// write"), yet the README says, without that condition, that no worker can
// "write outside the state directory". It writes wherever its user may:
// /tmp, /dev/shm, its home, and every file of the backend's user (its
// configuration, its --acl if that user owns it).
func TestReview2NonRootWorkerWritesOutsideStateRoot(t *testing.T) {
	review2Root(t) // to start a child as another user
	base, err := os.MkdirTemp("", "review2-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	// The test binary, where uid 65534 may run it.
	bin := filepath.Join(base, "worker.test")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(dst, src)
	src.Close()
	dst.Close()
	state := filepath.Join(base, "state")
	shared := filepath.Join(base, "shared") // stands in for /tmp, /dev/shm
	for _, d := range []string{state, shared} {
		if err := os.Mkdir(d, 0o777); err != nil {
			t.Fatal(err)
		}
		os.Chmod(d, 0o777)
	}
	// As a backend run by a user other than root gets it (e.g. a unit with
	// User= and CapabilityBoundingSet= empty): with a full bounding set a
	// non-root worker cannot drop it (PR_CAPBSET_DROP needs CAP_SETPCAP)
	// and checkEarly refuses to serve at all.
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("no setpriv to start a worker as another user with an empty bounding set")
	}
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all", "--inh-caps=-all", "--",
		bin, "-test.run=^$", "--", "--conn-fd", "--state-root", state)
	target := filepath.Join(shared, "outside")
	out, err := review2Run(t, cmd, "write", target)
	if err != nil {
		t.Logf("the attack failed: %v: %s", err, out)
		return
	}
	if _, err := os.Stat(target); err == nil {
		t.Errorf("a confined worker running as uid 65534 (state root %s) wrote %s outside its state root; confine.Worker accepted it without any mount isolation, and the README's \"no worker can ... write outside the state directory\" does not say it holds for root workers only", state, target)
	}
}

// A directory descriptor open in the worker before the constructor runs
// names a mount of the backend's namespace, which stays writable: openat
// on it (allowed) writes outside the state root. The supervisor's spawn
// (os/exec) hands every worker each descriptor the supervisor itself
// inherited without O_CLOEXEC (in this test environment a worker shows a
// stray fd 251), and the constructor closes none of them before its
// unshare; a directory among them (a wrapper's `exec 9</`, a service
// manager's passed descriptor) undoes the isolation.
func TestReview2InheritedDirFDEscapesMountNamespace(t *testing.T) {
	review2Root(t)
	outer := t.TempDir()
	state := filepath.Join(outer, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(outer) // stands in for an inherited directory such as /etc
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	cmd := workerCommand(state)
	cmd.ExtraFiles = []*os.File{d} // fd 3 in the worker
	target := filepath.Join(outer, "escaped")
	out, err := review2Run(t, cmd, "dirfd", target)
	if err != nil {
		t.Logf("the attack failed: %v: %s", err, out)
		return
	}
	if b, err := os.ReadFile(target); err == nil {
		t.Errorf("a confined root worker wrote %s (%q) outside its state root %s through a directory descriptor it had before the constructor's unshare", target, b, state)
	}
}
