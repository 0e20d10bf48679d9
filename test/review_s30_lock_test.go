package test

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// s30GetRandom sends TPM2_GetRandom(8) on a data socket.
func s30GetRandom(sock string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	tpm, err := tpmsock.Dial(ctx, "unix", sock)
	if err != nil {
		return err
	}
	defer tpm.Close()
	resp, err := tpm.Send([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8})
	if err != nil {
		return err
	}
	if len(resp) < 10 || resp[6]|resp[7]|resp[8]|resp[9] != 0 {
		return fmt.Errorf("GetRandom: response % x", resp)
	}
	return nil
}

// s30Start starts `cvtpm socket args...` and waits until sock serves (or
// the process exits, or 10 s pass: then ok is false).
func s30Start(t *testing.T, env []string, sock string, args ...string) (cmd *exec.Cmd, ok bool) {
	t.Helper()
	bin := testenv.Binary(t, testenv.Cvtpm)
	cmd = exec.Command(bin, append([]string{"socket"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		select {
		case <-exited:
			return cmd, false
		default:
		}
		if s30GetRandom(sock) == nil {
			return cmd, true
		}
	}
	return cmd, false
}

// The state directory named by TPM_PATH (swtpm's environment variable,
// which parseSocketArgs accepts in place of --tpmstate) is never locked:
// stateLock is only set while parsing --tpmstate. Two drop-ins started on
// one directory (a double start, or a second VM definition pointing at
// the same directory) both serve it and overwrite each other's NV writes.
func TestReviewS30TPMPathIsNotLocked(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "state")
	env := []string{"TPM_PATH=" + st}
	a, b := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	if _, ok := s30Start(t, env, a, "--tpm2", "--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+a, "--ctrl", "type=unixio,path="+a+".ctrl"); !ok {
		t.Fatal("the first instance does not serve")
	}
	if _, ok := s30Start(t, env, b, "--tpm2", "--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+b, "--ctrl", "type=unixio,path="+b+".ctrl"); ok {
		t.Fatalf("a second instance serves TPM_PATH=%s while the first does (the directory is not locked)", st)
	}
}

// An instance started with --migration incoming takes no lock until the
// state arrives or CMD_INIT (migrationLocking), but --flags not-need-init
// initialises the engine directly (tpm.Init, not through
// migrationLocking): it reads and serves a directory another process
// holds the lock of.
func TestReviewS30IncomingNotNeedInitServesALockedDirectory(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "state")
	a, b := filepath.Join(dir, "a.sock"), filepath.Join(dir, "b.sock")
	if _, ok := s30Start(t, nil, a, "--tpm2", "--tpmstate", "dir="+st, "--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+a, "--ctrl", "type=unixio,path="+a+".ctrl"); !ok {
		t.Fatal("the first instance does not serve")
	}
	if _, ok := s30Start(t, nil, b, "--tpm2", "--tpmstate", "dir="+st, "--migration", "incoming",
		"--flags", "not-need-init,startup-clear",
		"--server", "type=unixio,path="+b, "--ctrl", "type=unixio,path="+b+".ctrl"); ok {
		t.Fatal("an incoming instance with not-need-init serves the directory the first instance holds locked")
	}
}

// A second start with --migration incoming on a running instance's
// directory and socket paths (the double start
// TestSocketSecondStartLeavesTheFirstReachable covers without
// --migration) takes no lock before it listens, so listen removes the
// live instance's socket files and binds its own: the running instance
// is unreachable by path for good, and the newcomer keeps running.
func TestReviewS30IncomingSecondStartTakesTheLiveSockets(t *testing.T) {
	dir := t.TempDir()
	st := filepath.Join(dir, "state")
	sock := filepath.Join(dir, "tpm.sock")
	common := []string{"--tpm2", "--tpmstate", "dir=" + st, "--server", "type=unixio,path=" + sock, "--ctrl", "type=unixio,path=" + sock + ".ctrl"}
	if _, ok := s30Start(t, nil, sock, append(common, "--flags", "not-need-init,startup-clear")...); !ok {
		t.Fatal("the first instance does not serve")
	}
	var before syscall.Stat_t
	syscall.Stat(sock, &before)
	bin := testenv.Binary(t, testenv.Cvtpm)
	second := exec.Command(bin, append([]string{"socket"}, append(common, "--migration", "incoming")...)...)
	second.Stderr = io.Discard
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { second.Process.Signal(syscall.SIGTERM); second.Wait() }()
	time.Sleep(1500 * time.Millisecond)
	var after syscall.Stat_t
	if err := syscall.Stat(sock, &after); err != nil || after.Ino != before.Ino {
		t.Errorf("the running instance's data socket file was replaced by the incoming second start (inode %d -> %d, %v)", before.Ino, after.Ino, err)
	}
	if err := s30GetRandom(sock); err != nil {
		t.Errorf("the running instance no longer serves at its path: %v", err)
	}
}

// The sibling check (C constructor and trustedSibling alike) stats
// cvtpm-swtpm through symlinks: in a directory others may add files to
// (the case the check exists for), a user plants cvtpm-swtpm as a symlink
// to any root-owned executable and `cvtpm socket` runs that, with the
// operator's arguments and privileges. /bin/true stands for the chosen
// program here: the drop-in never serves and exits 0. (Needs
// fs.protected_symlinks=0 for a sticky world-writable directory, or any
// other shared directory that is not sticky.)
func TestReviewS30SymlinkedSiblingRuns(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to own the copy and chown the symlink")
	}
	src := testenv.Binary(t, testenv.Cvtpm)
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(shared, 0o1777)
	bin := filepath.Join(shared, "cvtpm")
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	truePath, err := exec.LookPath("true")
	if err != nil {
		t.Skip("no true")
	}
	truePath, _ = filepath.EvalSymlinks(truePath)
	link := filepath.Join(shared, "cvtpm-swtpm")
	if err := os.Symlink(truePath, link); err != nil {
		t.Fatal(err)
	}
	os.Lchown(link, 65534, 65534) // planted by another user
	sock := filepath.Join(dir, "tpm.sock")
	cmd := exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
		"--flags", "not-need-init,startup-clear", "--server", "type=unixio,path="+sock, "--ctrl", "type=unixio,path="+sock+".ctrl")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("cvtpm socket exited at once (%v) without serving: it ran the planted symlink's target %s\n%s", err, truePath, out.String())
	case <-time.After(1500 * time.Millisecond):
		cmd.Process.Signal(syscall.SIGTERM)
		<-done
	}
}
