package testenv

import (
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// AsNobody is argv run by setpriv as uid and gid 65534 without
// supplementary groups (and so without capabilities).
func AsNobody(argv ...string) []string {
	return append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"}, argv...)
}

// EnvironReadableByNobody says whether a process of uid 65534 without
// capabilities may read /proc/PID/environ: the kernel lets the same user
// read a dumpable process's and refuses a non-dumpable one's (the check
// that also guards /proc/PID/mem and ptrace). It returns what cat said.
func EnvironReadableByNobody(pid int) (bool, string) {
	argv := AsNobody("cat", "/proc/"+strconv.Itoa(pid)+"/environ")
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	return err == nil, string(out)
}

// NeedNobody skips tb unless this machine can show a process's
// dumpability to uid 65534: the test runs as root (to start processes as
// 65534), setpriv is installed, and a dumpable process of 65534 (a
// control) is readable by 65534, as the kernel allows.
func NeedNobody(tb testing.TB) {
	tb.Helper()
	if os.Getuid() != 0 {
		tb.Skip("needs root, to run processes as another user")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		tb.Skip("setpriv (util-linux) is not installed")
	}
	argv := AsNobody("sleep", "30")
	control := exec.Command(argv[0], argv[1:]...)
	if err := control.Start(); err != nil {
		tb.Fatal(err)
	}
	defer func() { control.Process.Kill(); control.Wait() }()
	comm := "/proc/" + strconv.Itoa(control.Process.Pid) + "/comm"
	for range 100 { // until setpriv has exec'd sleep
		if b, _ := os.ReadFile(comm); string(b) == "sleep\n" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if ok, out := EnvironReadableByNobody(control.Process.Pid); !ok {
		tb.Skipf("this machine refuses a dumpable process's /proc/PID/environ to its own user: %s", out)
	}
}

// OpenTempDir is a directory for tb, removed at its end, outside
// tb.TempDir, whose parents are closed to other users: one that another
// user (65534) can reach, or a shared one, with the given mode.
func OpenTempDir(tb testing.TB, prefix string, mode os.FileMode) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, mode); err != nil {
		tb.Fatal(err)
	}
	return dir
}
