package test

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// TestDropInClosesInheritedDescriptors: the swtpm drop-in closes, before it
// serves, every descriptor it inherited that no option names, so that code
// a guest ran in it through a libtpms bug cannot use what its parent left
// open (the seccomp filter allows reading and writing any descriptor the
// process has). The descriptors its options name (--pid fd=, --log fd=)
// stay usable. Both binaries: cvtpm-swtpm and `cvtpm socket`, which execs
// it.
func TestDropInClosesInheritedDescriptors(t *testing.T) {
	binDir := filepath.Dir(testenv.Binary(t, testenv.Cvtpm))
	for _, bin := range []string{"cvtpm-swtpm", "cvtpm"} {
		t.Run(bin, func(t *testing.T) {
			dir := t.TempDir()
			// fd 3: a pipe's write end (the parent sees EOF once no process
			// holds it); fd 4: one end of a socket pair (likewise).
			strayR, strayW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer strayR.Close()
			pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			// Non-blocking, so that os.File's read deadline applies to it.
			if err := syscall.SetNonblock(pair[0], true); err != nil {
				t.Fatal(err)
			}
			ours, theirs := os.NewFile(uintptr(pair[0]), "ours"), os.NewFile(uintptr(pair[1]), "theirs")
			defer ours.Close()
			// fd 5 (--pid fd=5) and fd 6 (--log fd=6): named.
			pidR, pidW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pidR.Close()
			logPath := filepath.Join(dir, "log")
			logFile, err := os.Create(logPath)
			if err != nil {
				t.Fatal(err)
			}
			data := filepath.Join(dir, "data.sock")
			cmd := exec.Command(filepath.Join(binDir, bin), "socket", "--tpm2", "--tpmstate", "dir="+filepath.Join(dir, "state"),
				"--flags", "not-need-init,startup-clear", "--server", "type=unixio,path="+data,
				"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--pid", "fd=5", "--log", "fd=6,level=5")
			cmd.ExtraFiles = []*os.File{strayW, theirs, pidW, logFile}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			strayW.Close()
			theirs.Close()
			pidW.Close()
			logFile.Close()
			defer func() {
				cmd.Process.Signal(syscall.SIGTERM)
				cmd.Wait()
			}()

			// The pid arrives through the named descriptor, written once the
			// sockets listen (after the descriptors were closed).
			pidCh := make(chan string, 1)
			go func() { b, _ := io.ReadAll(pidR); pidCh <- string(b) }()
			select {
			case got := <-pidCh:
				if got != strconv.Itoa(cmd.Process.Pid) {
					b, _ := os.ReadFile(logPath)
					t.Fatalf("--pid fd=5 gave %q, want %d\n%s", got, cmd.Process.Pid, b)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("no pid through --pid fd=5")
			}
			conn, err := tpmsock.Dial(context.Background(), "unix", data)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(conn); err != nil {
				t.Fatalf("GetRandom: %v", err)
			}

			// The unnamed ones are closed in the drop-in: the other ends
			// read EOF while it serves.
			for name, f := range map[string]*os.File{"fd 3 (a pipe)": strayR, "fd 4 (a socket)": ours} {
				f.SetReadDeadline(time.Now().Add(5 * time.Second))
				if n, err := f.Read(make([]byte, 1)); n != 0 || err != io.EOF {
					t.Errorf("%s, inherited and named by no option, is still open in the drop-in (read: %d, %v)", name, n, err)
				}
			}
			if cmd.ProcessState != nil {
				t.Fatalf("the drop-in exited: %v", cmd.ProcessState)
			}
			// The log, through the named fd 6, says what was closed.
			b, err := os.ReadFile(logPath)
			if err != nil {
				t.Fatal(err)
			}
			// (This test's own process may pass on more than 3 and 4: what it
			// inherited without close-on-exec goes on to its children.)
			var closed []string
			for sc := bufio.NewScanner(strings.NewReader(string(b))); sc.Scan(); {
				if _, list, ok := strings.Cut(sc.Text(), `closed inherited descriptors that no option names" fds="[`); ok {
					list, _, _ = strings.Cut(list, "]")
					closed = strings.Fields(list)
				}
			}
			if !slices.Contains(closed, "3") || !slices.Contains(closed, "4") || slices.Contains(closed, "5") || slices.Contains(closed, "6") ||
				!strings.Contains(string(b), "cvtpm socket ready") {
				t.Errorf("the log (--log fd=6) does not name 3 and 4, and not 5 and 6, as closed, or lacks the ready line:\n%s", b)
			}
		})
	}
}
