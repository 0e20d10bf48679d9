package confine

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// dropInWritesChild runs as "<test binary> socket ...", so the
// constructor has confined it as it confines cvtpm-swtpm; it tries each
// kind of write on the paths in DROPIN_WRITES_* and prints one line per
// try: "<what>: ok" or "<what>: <error>".
func dropInWritesChild() int {
	if ok, err := DropInLandlock(); !ok || err != nil {
		fmt.Printf("landlock: ok=%v %v\n", ok, err)
		if errors.Is(err, ErrNoLandlock) {
			return 4
		}
		return 3
	}
	state, other, sock, pid, logf := os.Getenv("DROPIN_WRITES_STATE"), os.Getenv("DROPIN_WRITES_OTHER"),
		os.Getenv("DROPIN_WRITES_SOCK"), os.Getenv("DROPIN_WRITES_PID"), os.Getenv("DROPIN_WRITES_LOG")
	try := func(what string, f func() error) {
		if err := f(); err != nil {
			fmt.Printf("%s: %v\n", what, err)
		} else {
			fmt.Printf("%s: ok\n", what)
		}
	}
	create := func(p string) func() error {
		return func() error { return os.WriteFile(p, []byte("x"), 0o600) }
	}
	appendTo := func(p string) func() error {
		return func() error {
			f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
			if err != nil {
				return err
			}
			return f.Close()
		}
	}
	bind := func(p string) func() error {
		return func() error {
			fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Bind(fd, &unix.SockaddrUnix{Name: p})
		}
	}
	try("create in state", create(filepath.Join(state, "new")))
	try("rename in state", func() error { return os.Rename(filepath.Join(state, "new"), filepath.Join(state, "renamed")) })
	try("mkdir in state", func() error { return os.Mkdir(filepath.Join(state, "sub"), 0o700) })
	try("remove in state", func() error { return os.Remove(filepath.Join(state, "renamed")) })
	try("bind socket", bind(sock))
	try("create pid file", create(pid))
	try("append to log", appendTo(logf))
	try("write /dev/null", appendTo(os.DevNull))
	try("create elsewhere", create(filepath.Join(other, "new")))
	try("append elsewhere", appendTo(filepath.Join(other, "old")))
	try("truncate elsewhere", func() error { return os.Truncate(filepath.Join(other, "old"), 0) })
	try("remove elsewhere", func() error { return os.Remove(filepath.Join(other, "old")) })
	try("rename elsewhere", func() error { return os.Rename(filepath.Join(other, "old"), filepath.Join(other, "moved")) })
	try("mkdir elsewhere", func() error { return os.Mkdir(filepath.Join(other, "sub"), 0o700) })
	try("symlink elsewhere", func() error { return os.Symlink("/", filepath.Join(other, "link")) })
	try("bind socket elsewhere", bind(filepath.Join(other, "s.sock")))
	return 0
}

// childResults reads a drop-in child's "<what>: <result>" lines.
func childResults(out []byte) map[string]string {
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		what, res, _ := strings.Cut(line, ": ")
		got[what] = res
	}
	return got
}

// TestDropInWritesOnlyWhereNamed: the drop-in's constructor lets it
// create, write, truncate, rename and remove files only where its command
// line says it writes: beneath its state directory, in its sockets' and
// pid file's directories, its log file, /dev/null. Anywhere else its user
// may write (another instance's state directory here) it cannot, though
// the directory is its own and mode 0700.
func TestDropInWritesOnlyWhereNamed(t *testing.T) {
	root := t.TempDir()
	dirs := map[string]string{}
	for _, d := range []string{"state", "other", "run", "logs"} {
		dirs[d] = filepath.Join(root, d)
		if err := os.Mkdir(dirs[d], 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(dirs["other"], "old"), filepath.Join(dirs["logs"], "log")} {
		if err := os.WriteFile(f, []byte("kept"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	sock, pid, logf := filepath.Join(dirs["run"], "tpm.sock"), filepath.Join(dirs["run"], "tpm.pid"), filepath.Join(dirs["logs"], "log")
	cmd := exec.Command(os.Args[0], "socket", "--tpm2", "--tpmstate", "dir="+dirs["state"],
		"--server", "type=unixio,path="+sock, "--ctrl=type=unixio,path="+sock+".ctrl", "--pid", "file="+pid, "--log", "file="+logf+",level=2")
	cmd.Env = append(os.Environ(), "DROPIN_WRITES_CHILD=1", "DROPIN_WRITES_STATE="+dirs["state"], "DROPIN_WRITES_OTHER="+dirs["other"],
		"DROPIN_WRITES_SOCK="+sock, "DROPIN_WRITES_PID="+pid, "DROPIN_WRITES_LOG="+logf)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok && ee.ExitCode() == 4 {
		t.Skipf("no Landlock here: %s", out)
	}
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	got := childResults(out)
	for _, what := range []string{"create in state", "rename in state", "mkdir in state", "remove in state", "bind socket",
		"create pid file", "append to log", "write /dev/null"} {
		if got[what] != "ok" {
			t.Errorf("%s: %q, want ok", what, got[what])
		}
	}
	for _, what := range []string{"create elsewhere", "append elsewhere", "truncate elsewhere", "remove elsewhere",
		"rename elsewhere", "mkdir elsewhere", "symlink elsewhere", "bind socket elsewhere"} {
		if !strings.HasSuffix(got[what], "permission denied") {
			t.Errorf("%s: %q, want permission denied (Landlock)", what, got[what])
		}
	}
	if b, _ := os.ReadFile(filepath.Join(dirs["other"], "old")); string(b) != "kept" {
		t.Errorf("the other directory's file now holds %q", b)
	}
}
