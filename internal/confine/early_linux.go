package confine

/*
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/securebits.h>

// struct mount_attr and its flags (linux/mount.h, which clashes with
// glibc's sys/mount.h in some versions).
struct cvtpm_mount_attr {
	uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#define CVTPM_MOUNT_ATTR_RDONLY 0x00000001
#define CVTPM_MOUNT_ATTR_NOSUID 0x00000002
#define CVTPM_MOUNT_ATTR_NODEV 0x00000004
#define CVTPM_AT_RECURSIVE 0x8000

// What the constructor did, for Go to check (checkEarly): 0 done, or the
// errno of the step that failed; -1 not attempted (not a worker, or not
// root: a worker of another user has none of root's files to write).
static int cvtpm_mounts_errno = -1;
static const char *cvtpm_mounts_step = "";

static int cvtpm_fail(const char *step) {
	cvtpm_mounts_step = step;
	cvtpm_mounts_errno = errno ? errno : EINVAL;
	return -1;
}

static int cvtpm_setattr(const char *path, uint64_t set, uint64_t clr) {
	struct cvtpm_mount_attr attr;
	memset(&attr, 0, sizeof attr);
	attr.attr_set = set;
	attr.attr_clr = clr;
	return syscall(SYS_mount_setattr, AT_FDCWD, path, CVTPM_AT_RECURSIVE, &attr, sizeof attr);
}

// A root worker gets a mount namespace of its own in which the whole tree
// is read-only, without devices or set-uid programs, except the backend's
// state directory (--state-root), and /proc, /sys and /dev are empty: uid
// 0 without capabilities could otherwise still write root's files
// (configuration, binaries, sysctls, block devices) and reach other
// processes' roots through /proc/PID/root.
static void cvtpm_isolate_mounts(const char *state_root) {
	errno = 0;
	if (state_root == NULL || state_root[0] != '/') {
		cvtpm_fail("--state-root (an absolute path) is required");
		return;
	}
	if (unshare(CLONE_NEWNS) != 0) {
		cvtpm_fail("unshare(CLONE_NEWNS)");
		return;
	}
	// Nothing done here propagates back to the backend's namespace.
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) {
		cvtpm_fail("making the mounts private");
		return;
	}
	// The state root stays writable: a mount of its own first, so that the
	// recursive read-only below can be lifted on it alone.
	if (mount(state_root, state_root, NULL, MS_BIND | MS_REC, NULL) != 0) {
		cvtpm_fail("bind-mounting the state root");
		return;
	}
	if (cvtpm_setattr("/", CVTPM_MOUNT_ATTR_RDONLY | CVTPM_MOUNT_ATTR_NOSUID | CVTPM_MOUNT_ATTR_NODEV, 0) != 0) {
		cvtpm_fail("making every mount read-only (mount_setattr, Linux 5.12)");
		return;
	}
	if (cvtpm_setattr(state_root, CVTPM_MOUNT_ATTR_NOSUID | CVTPM_MOUNT_ATTR_NODEV, CVTPM_MOUNT_ATTR_RDONLY) != 0) {
		cvtpm_fail("making the state root writable again");
		return;
	}
	const char *hide[] = {"/proc", "/sys", "/dev"};
	for (int i = 0; i < 3; i++) {
		if (mount("none", hide[i], "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555") != 0) {
			cvtpm_fail(hide[i]);
			return;
		}
	}
	cvtpm_mounts_errno = 0;
}

// A worker (any process started with --conn-fd, the worker's one required
// flag, whichever binary runs it) gives up, before the Go runtime starts a
// single thread, what would let code running in it reach other processes:
// as root, it isolates its mounts (above); then it becomes non-dumpable
// (no /proc/PID/mem, /proc/PID/fd or ptrace of it by processes without
// CAP_SYS_PTRACE, which the other workers no longer have) and drops every
// capability (bounding set, ambient, effective, permitted, inheritable;
// securebits so that root gets none back on exec). Capabilities belong to
// threads: done here, while the process has one, it holds for every thread
// the runtime starts later. Go checks the outcome in Worker.
__attribute__((constructor)) static void cvtpm_confine_worker_early(int argc, char **argv, char **envp) {
	int worker = 0;
	const char *state_root = NULL;
	for (int i = 1; i < argc && argv != NULL && argv[i] != NULL; i++) {
		if (strcmp(argv[i], "--conn-fd") == 0) {
			worker = 1;
		}
		if (strcmp(argv[i], "--state-root") == 0 && i + 1 < argc) {
			state_root = argv[i + 1];
		} else if (strncmp(argv[i], "--state-root=", 13) == 0) {
			state_root = argv[i] + 13;
		}
	}
	if (!worker) {
		return;
	}
	if (geteuid() == 0) {
		cvtpm_isolate_mounts(state_root);
	}
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	// Needs CAP_SETPCAP, so before the capabilities go; fails harmlessly
	// for a worker that never had any.
	prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
		SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE |
		SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED, 0, 0, 0);
	for (int cap = 0; cap < 64; cap++) {
		prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
	}
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof data);
	syscall(SYS_capset, &hdr, data);
}

static int cvtpm_mounts_result(void) { return cvtpm_mounts_errno; }
static const char *cvtpm_mounts_failed_step(void) { return cvtpm_mounts_step; }
*/
import "C"

import (
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// checkEarly reports whether the process did what the constructor above
// does: a worker that kept a capability, stayed dumpable, or runs as root
// with the system's files in reach (a platform where the constructor did
// not run, a capset or mount that failed) must not serve.
func checkEarly() error {
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 0 {
		return fmt.Errorf("the worker is still dumpable (%d, %v): other processes of its user could read its memory", d, err)
	}
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("checking the worker's capabilities: %w", err)
	}
	for _, d := range data {
		if d.Effective|d.Permitted|d.Inheritable != 0 {
			return fmt.Errorf("the worker kept capabilities (effective %#x, permitted %#x)", d.Effective, d.Permitted)
		}
	}
	for c := range 64 {
		if in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0); err == nil && in == 1 {
			return fmt.Errorf("the worker kept capability %d in its bounding set", c)
		}
	}
	if os.Geteuid() == 0 {
		if e := C.cvtpm_mounts_result(); e != 0 {
			return fmt.Errorf("the worker runs as root and could not isolate its mounts (%s): %w", C.GoString(C.cvtpm_mounts_failed_step()), syscall.Errno(e))
		}
	}
	return nil
}

// NotDumpable makes the process non-dumpable: processes of the same user
// without CAP_SYS_PTRACE (every worker) can no longer read its memory or
// reopen its descriptors through /proc, nor ptrace it. The backend's
// supervisor, which holds every key, calls it first thing.
func NotDumpable() error {
	return unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0)
}
