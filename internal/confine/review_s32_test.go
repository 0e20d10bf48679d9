package confine

// Review s32: the W^X part of the filters (mmap and mprotect never
// executable) against the drop-in's allow-list as a guest that took over
// libtpms, or the host that starts it, would use it.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

//go:noinline
func reviewS32Answer() int { return 1 }

func reviewS32Child(what string) int {
	// As confineDropIn: non-dumpable, then the filter.
	if err := NotDumpable(); err != nil {
		fmt.Println(err)
		return 3
	}
	if err := DropIn(ModeKill); err != nil {
		fmt.Println(err)
		return 3
	}
	switch what {
	case "proc-self-mem":
		// openat and pwrite64 are allowed (the drop-in reads and writes
		// files), and /proc/self/mem writes with FOLL_FORCE: through it,
		// bytes of the attacker's choosing land in the text segment,
		// which stays executable. mov eax, 42; ret.
		code := []byte{0xb8, 42, 0, 0, 0, 0xc3}
		fd, err := unix.Open("/proc/self/mem", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			fmt.Println("open /proc/self/mem:", err)
			return 0
		}
		pc := reflect.ValueOf(reviewS32Answer).Pointer()
		if _, err := unix.Pwrite(fd, code, int64(pc)); err != nil {
			fmt.Println("pwrite /proc/self/mem:", err)
			return 0
		}
		fmt.Printf("ran written code: %d\n", reviewS32Answer())
		return 0
	}
	return 5
}

func reviewS32Run(t *testing.T, what string) string {
	t.Helper()
	if runtime.GOOS != "linux" || runtime.GOARCH != "amd64" {
		t.Skip("the filter is for linux/amd64")
	}
	// As the drop-in is started ("... socket ..."): its constructor
	// (early_linux.go) confines what the process may open for writing
	// before Go starts. TestMain runs the child.
	cmd := exec.Command(os.Args[0], "socket")
	cmd.Env = append(os.Environ(), "REVIEW_S32_CHILD="+what)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	t.Logf("child %s: %v\n%s", what, err, out.String())
	return out.String()
}

// TestReviewS32DropInProcSelfMemMakesCode: under the drop-in's filter,
// which refuses mmap and mprotect with PROT_EXEC so that "bytes a guest
// wrote cannot become code", the process still opens /proc/self/mem
// (openat is allowed; the drop-in has no mount namespace; non-dumpable
// does not stop a process's access to itself) and pwrite64s its own
// text: FOLL_FORCE writes through the read-only, executable mapping, and
// the bytes run. The W^X claim (README, confine.go, --help) does not hold
// for the drop-in.
//
// Fixed: the drop-in's constructor has Landlock refuse opening files
// beneath /proc and /sys for writing (DropInLandlock).
func TestReviewS32DropInProcSelfMemMakesCode(t *testing.T) {
	out := reviewS32Run(t, "proc-self-mem")
	if strings.Contains(out, "ran written code: 42") {
		t.Errorf("under the drop-in's filter (kill), code written through /proc/self/mem into the text segment ran: W^X is bypassed with allowed calls (openat, pwrite64)")
	}
	if !strings.Contains(out, "open /proc/self/mem: permission denied") {
		t.Errorf("want the open of /proc/self/mem for writing refused (EACCES, Landlock)")
	}
}
