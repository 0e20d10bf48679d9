package confine

/*
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <dirent.h>
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

// Structures and flags of the mount API (linux/mount.h and
// linux/openat2.h clash with glibc's headers in some versions).
struct cvtpm_mount_attr {
	uint64_t attr_set, attr_clr, propagation, userns_fd;
};
struct cvtpm_open_how {
	uint64_t flags, mode, resolve;
};
#define CVTPM_MOUNT_ATTR_NOSUID 0x00000002
#define CVTPM_MOUNT_ATTR_NODEV 0x00000004
#define CVTPM_AT_RECURSIVE 0x8000
#define CVTPM_OPEN_TREE_CLONE 1
#define CVTPM_MOVE_MOUNT_F_EMPTY_PATH 0x00000004
#define CVTPM_RESOLVE_NO_MAGICLINKS 0x02
#define CVTPM_RESOLVE_NO_SYMLINKS 0x04

// What the constructor did, for Go to check (checkEarly): 0 done, or the
// errno of the step that failed; -1 not attempted (not a worker).
static int cvtpm_mounts_errno = -1;
static const char *cvtpm_mounts_step = "";

static void cvtpm_fail(const char *step) {
	cvtpm_mounts_step = step;
	cvtpm_mounts_errno = errno ? errno : EINVAL;
}

// cvtpm_mkdirs creates base + path, component by component.
static int cvtpm_mkdirs(const char *base, const char *path) {
	char buf[4096];
	if (strlen(base) + strlen(path) + 2 >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcpy(buf, base);
	for (const char *p = path; *p;) {
		while (*p == '/') {
			p++;
		}
		if (!*p) {
			break;
		}
		const char *e = strchr(p, '/');
		size_t n = e ? (size_t)(e - p) : strlen(p), l = strlen(buf);
		buf[l] = '/';
		memcpy(buf + l + 1, p, n);
		buf[l + 1 + n] = 0;
		if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
			return -1;
		}
		p += n;
	}
	return 0;
}

// cvtpm_write_file writes s to path (the user namespace's maps).
static int cvtpm_write_file(const char *path, const char *s) {
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		return -1;
	}
	ssize_t n = write(fd, s, strlen(s));
	close(fd);
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

// cvtpm_enter_userns gives a worker that does not run as root the right
// to build its mount namespace: a user namespace in which its own uid and
// gid are mapped to themselves (nothing more: it gains no access to
// anything outside) and it holds capabilities until it drops them below.
static int cvtpm_enter_userns(void) {
	char map[64];
	unsigned uid = (unsigned)geteuid(), gid = (unsigned)getegid();
	if (unshare(CLONE_NEWUSER) != 0) {
		return -1;
	}
	snprintf(map, sizeof map, "%u %u 1", uid, uid);
	if (cvtpm_write_file("/proc/self/uid_map", map) != 0 || cvtpm_write_file("/proc/self/setgroups", "deny") != 0) {
		return -1;
	}
	snprintf(map, sizeof map, "%u %u 1", gid, gid);
	return cvtpm_write_file("/proc/self/gid_map", map);
}

// A worker gets a mount namespace whose root is an empty, read-only
// tmpfs holding one thing: the backend's state directory (--state-root),
// at its own path, writable, without devices or set-uid programs. Nothing
// else of the file system is there: uid 0 without capabilities could
// otherwise still read and write root's files (keys, configuration,
// binaries), sysctls and FIFOs of root daemons (/run/initctl), and reach
// other processes' roots through /proc/PID/root. The state root must be an
// absolute path without symlinks: one the host could plant (on the disk it
// provides) must not choose what the worker sees.
static void cvtpm_isolate_mounts(const char *state_root) {
	errno = 0;
	char real[4096];
	if (state_root == NULL || state_root[0] != '/' || strcmp(state_root, "/") == 0 ||
		realpath(state_root, real) == NULL || strcmp(real, state_root) != 0) {
		errno = EINVAL;
		cvtpm_fail("--state-root must be an absolute directory path other than / and without symlinks");
		return;
	}
	if (geteuid() != 0 && cvtpm_enter_userns() != 0) {
		cvtpm_fail("a user namespace, for a worker that does not run as root (are unprivileged user namespaces disabled?)");
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
	// Opened in the new namespace (open_tree clones only mounts of the
	// caller's), refusing a symlink anywhere on the path.
	struct cvtpm_open_how how = {O_PATH | O_DIRECTORY | O_CLOEXEC, 0, CVTPM_RESOLVE_NO_SYMLINKS | CVTPM_RESOLVE_NO_MAGICLINKS};
	int sfd = syscall(SYS_openat2, AT_FDCWD, state_root, &how, sizeof how);
	if (sfd < 0) {
		cvtpm_fail("opening the state root (openat2, Linux 5.6)");
		return;
	}
	int tree = syscall(SYS_open_tree, sfd, "", CVTPM_OPEN_TREE_CLONE | O_CLOEXEC | AT_EMPTY_PATH | CVTPM_AT_RECURSIVE);
	if (tree < 0) {
		cvtpm_fail("cloning the state root's mount (open_tree, Linux 5.2)");
		return;
	}
	// nosuid and nodev on the state root: mount_setattr (Linux 5.12) on the
	// whole clone; on an older kernel, a remount of its top mount once it
	// is in place (below). CVTPM_CONFINE_OLD_KERNEL takes that way on any
	// kernel, for its test.
	struct cvtpm_mount_attr attr;
	memset(&attr, 0, sizeof attr);
	attr.attr_set = CVTPM_MOUNT_ATTR_NOSUID | CVTPM_MOUNT_ATTR_NODEV;
	int remount = getenv("CVTPM_CONFINE_OLD_KERNEL") != NULL;
	if (!remount && syscall(SYS_mount_setattr, tree, "", AT_EMPTY_PATH | CVTPM_AT_RECURSIVE, &attr, sizeof attr) != 0) {
		if (errno != ENOSYS) {
			cvtpm_fail("nosuid and nodev on the state root (mount_setattr)");
			return;
		}
		remount = 1;
	}
	// The new root: a tmpfs over the state root's path (the clone above
	// is not under it), with the path's directories and the state root
	// moved to the same path inside.
	if (mount("tmpfs", state_root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0755") != 0) {
		cvtpm_fail("mounting the new root");
		return;
	}
	char target[4096], old[4096];
	snprintf(target, sizeof target, "%s%s", state_root, state_root);
	snprintf(old, sizeof old, "%s/.oldroot", state_root);
	if (cvtpm_mkdirs(state_root, state_root) != 0 || cvtpm_mkdirs(state_root, "/.oldroot") != 0) {
		cvtpm_fail("making the new root's directories");
		return;
	}
	if (syscall(SYS_move_mount, tree, "", AT_FDCWD, target, CVTPM_MOVE_MOUNT_F_EMPTY_PATH) != 0) {
		cvtpm_fail("placing the state root in the new root (move_mount)");
		return;
	}
	if (remount) {
		// A remount sets every flag anew: keep those the mount has (a user
		// namespace may not clear them).
		struct statvfs sv;
		if (statvfs(target, &sv) != 0) {
			cvtpm_fail("reading the state root's mount flags");
			return;
		}
		unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV;
		if (sv.f_flag & ST_RDONLY) flags |= MS_RDONLY;
		if (sv.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
		if (sv.f_flag & ST_NOATIME) flags |= MS_NOATIME;
		if (sv.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
		if (sv.f_flag & ST_RELATIME) flags |= MS_RELATIME;
		if (mount(NULL, target, NULL, flags, NULL) != 0) {
			cvtpm_fail("nosuid and nodev on the state root (remount)");
			return;
		}
	}
	if (syscall(SYS_pivot_root, state_root, old) != 0 || chdir("/") != 0) {
		cvtpm_fail("pivot_root");
		return;
	}
	if (umount2("/.oldroot", MNT_DETACH) != 0 || rmdir("/.oldroot") != 0) {
		cvtpm_fail("letting go of the old root");
		return;
	}
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) {
		cvtpm_fail("making the new root read-only");
		return;
	}
	close(tree);
	close(sfd);
	cvtpm_mounts_errno = 0;
}

// cvtpm_close_inherited closes every descriptor above stderr but the
// worker's socket and key pipe: one the backend was given without
// close-on-exec and passed on (a directory, say) would name a mount
// outside the worker's namespace.
static void cvtpm_close_range(unsigned int from, unsigned int to) {
	if (syscall(SYS_close_range, from, to, 0) == 0) {
		return;
	}
	// Before Linux 5.9: one by one, up to the descriptor limit.
	long max = sysconf(_SC_OPEN_MAX);
	if (max < 0 || max > 1 << 20) {
		max = 1 << 20;
	}
	for (unsigned int fd = from; fd <= to && fd < (unsigned int)max; fd++) {
		close(fd);
	}
}

static void cvtpm_close_inherited(int keep1, int keep2) {
	int lo = keep1 < keep2 ? keep1 : keep2, hi = keep1 < keep2 ? keep2 : keep1;
	unsigned int from = 3;
	int keep[2] = {lo, hi};
	for (int i = 0; i < 2; i++) {
		if (keep[i] < 3) {
			continue;
		}
		if ((unsigned int)keep[i] > from) {
			cvtpm_close_range(from, (unsigned int)keep[i] - 1);
		}
		from = (unsigned int)keep[i] + 1;
	}
	cvtpm_close_range(from, ~0U);
}

// The descriptors above stderr that a swtpm drop-in ("... socket ...")
// had when it was executed, recorded before the Go runtime opens any of
// its own, so that DropInInherited can tell them from those. -1: not
// recorded (not a drop-in, or /proc/self/fd could not be read); -2: more
// than the list holds.
#define CVTPM_MAX_INHERITED 1024
static int cvtpm_inherited[CVTPM_MAX_INHERITED];
static int cvtpm_inherited_count = -1;
static int cvtpm_inherited_errno = 0;

struct cvtpm_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

// cvtpm_each_entry calls fn on every entry of the directory open at dfd
// (raw getdents64: no allocation, no descriptor of its own) until fn
// returns nonzero, which it returns; -1 with errno if reading failed.
static int cvtpm_each_entry(int dfd, int (*fn)(int dfd, struct cvtpm_dirent64 *d, void *arg), void *arg) {
	char buf[4096] __attribute__((aligned(8)));
	for (;;) {
		long got = syscall(SYS_getdents64, dfd, buf, sizeof buf);
		if (got < 0) {
			return -1;
		}
		if (got == 0) {
			return 0;
		}
		for (long off = 0; off < got;) {
			struct cvtpm_dirent64 *d = (struct cvtpm_dirent64 *)(buf + off);
			off += d->d_reclen;
			int r = fn(dfd, d, arg);
			if (r != 0) {
				return r;
			}
		}
	}
}

// cvtpm_record_fd adds an entry of /proc/self/fd to the record; 1 when
// the record is full.
static int cvtpm_record_fd(int dfd, struct cvtpm_dirent64 *d, void *arg) {
	int *n = arg;
	if (d->d_name[0] < '0' || d->d_name[0] > '9') {
		return 0;
	}
	int fd = atoi(d->d_name);
	if (fd <= 2 || fd == dfd) {
		return 0;
	}
	if (*n == CVTPM_MAX_INHERITED) {
		return 1;
	}
	cvtpm_inherited[(*n)++] = fd;
	return 0;
}

static void cvtpm_record_inherited(void) {
	int dfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		cvtpm_inherited_errno = errno;
		return;
	}
	int n = 0;
	int r = cvtpm_each_entry(dfd, cvtpm_record_fd, &n);
	if (r < 0) {
		cvtpm_inherited_errno = errno;
	}
	close(dfd);
	if (r == 0) {
		cvtpm_inherited_count = n;
	} else if (r == 1) {
		cvtpm_inherited_count = -2;
	}
}

static int cvtpm_inherited_n(void) { return cvtpm_inherited_count; }
static int cvtpm_inherited_err(void) { return cvtpm_inherited_errno; }
static int cvtpm_inherited_fd(int i) { return cvtpm_inherited[i]; }

// Landlock (Linux 5.13), by hand: glibc has no wrappers, and
// linux/landlock.h is missing from older headers.
#define CVTPM_SYS_landlock_create_ruleset 444
#define CVTPM_SYS_landlock_add_rule 445
#define CVTPM_SYS_landlock_restrict_self 446
#define CVTPM_LANDLOCK_RULE_PATH_BENEATH 1
#define CVTPM_LANDLOCK_ACCESS_FS_WRITE_FILE (1ULL << 1)
struct cvtpm_landlock_ruleset_attr {
	uint64_t handled_access_fs;
};
struct cvtpm_landlock_path_beneath_attr {
	uint64_t allowed_access;
	int32_t parent_fd;
} __attribute__((packed));

// What the drop-in's Landlock step did: -1 not attempted, 0 done, or the
// errno of the step that failed (cvtpm_landlock_step).
static int cvtpm_landlock_errno = -1;
static int cvtpm_landlock_unavailable = 0;
static const char *cvtpm_landlock_step = "";

static void cvtpm_landlock_fail(const char *step) {
	cvtpm_landlock_step = step;
	cvtpm_landlock_errno = errno ? errno : EINVAL;
}

// cvtpm_allow_writes_beneath adds a rule allowing writes beneath one
// entry of / (dfd) to the ruleset *arg, unless it is proc, sys or a
// symlink; 1 (errno set) if the kernel refused the rule.
static int cvtpm_allow_writes_beneath(int dfd, struct cvtpm_dirent64 *d, void *arg) {
	int rs = *(int *)arg;
	const char *n = d->d_name;
	if (strcmp(n, ".") == 0 || strcmp(n, "..") == 0 || strcmp(n, "proc") == 0 || strcmp(n, "sys") == 0) {
		return 0;
	}
	// Symlinks (/lib -> usr/lib) need no rule: Landlock checks the path a
	// file is reached by once resolved, and that path runs through
	// another entry of / (or through /proc or /sys, which stay denied).
	// Fewer rules, a shorter start.
	struct stat st;
	if (d->d_type == DT_LNK ||
		(d->d_type == DT_UNKNOWN && fstatat(dfd, n, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode))) {
		return 0;
	}
	int fd = openat(dfd, n, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0) {
		return 0; // gone meanwhile
	}
	struct cvtpm_landlock_path_beneath_attr pb = {CVTPM_LANDLOCK_ACCESS_FS_WRITE_FILE, fd};
	long r = syscall(CVTPM_SYS_landlock_add_rule, rs, CVTPM_LANDLOCK_RULE_PATH_BENEATH, &pb, 0);
	int e = errno;
	close(fd);
	errno = e;
	return r != 0;
}

// cvtpm_no_writes_in_proc_sys keeps the drop-in, and every thread it will
// have, from opening a file for writing beneath /proc or /sys: through
// /proc/self/mem a process writes its own code (the kernel forces the
// write through the read-only mapping), which would undo the seccomp
// filter's refusal of executable memory, and /proc/PID/mem, /proc/sys
// and /sys are where code taken over in it would go next on the host.
// Landlock denies the rights a ruleset handles except beneath the paths
// it names; this one handles only opening for writing, and names every
// entry of / but proc and sys, so everything else the drop-in (and its
// user) could write stays writable. It belongs to the calling thread and
// the threads it starts, so it is done here, while the process has one
// thread: Go cannot apply it to threads that already run (no TSYNC
// before Linux 6.x, no AllThreadsSyscall with cgo). A procfs mounted
// elsewhere than /proc (in a container's tree, say) is not covered.
static void cvtpm_no_writes_in_proc_sys(void) {
	errno = 0;
	struct cvtpm_landlock_ruleset_attr attr = {CVTPM_LANDLOCK_ACCESS_FS_WRITE_FILE};
	int rs = syscall(CVTPM_SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
	if (rs < 0) {
		// ENOSYS, EOPNOTSUPP: no Landlock in this kernel; EPERM: none for
		// this process (a container's seccomp profile older than Landlock
		// answers so; Landlock itself never does here).
		cvtpm_landlock_unavailable = errno == ENOSYS || errno == EOPNOTSUPP || errno == EPERM;
		cvtpm_landlock_fail("creating a Landlock ruleset (Landlock needs Linux 5.13 and lsm=landlock)");
		return;
	}
	int root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0) {
		cvtpm_landlock_fail("opening /");
		close(rs);
		return;
	}
	int r = cvtpm_each_entry(root, cvtpm_allow_writes_beneath, &rs);
	if (r != 0) {
		cvtpm_landlock_fail(r < 0 ? "reading /" : "adding a Landlock rule");
		close(root);
		close(rs);
		return;
	}
	close(root);
	// The kernel asks no_new_privs of an unprivileged process that
	// restricts itself; the seccomp filter sets it later anyway.
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
		cvtpm_landlock_fail("no_new_privs");
		close(rs);
		return;
	}
	if (syscall(CVTPM_SYS_landlock_restrict_self, rs, 0) != 0) {
		cvtpm_landlock_fail("landlock_restrict_self");
		close(rs);
		return;
	}
	close(rs);
	cvtpm_landlock_errno = 0;
}

static int cvtpm_landlock_result(void) { return cvtpm_landlock_errno; }
static int cvtpm_landlock_none(void) { return cvtpm_landlock_unavailable; }
static const char *cvtpm_landlock_failed_step(void) { return cvtpm_landlock_step; }

// cvtpm_unconfined says whether the drop-in's command line asks for no
// confinement: its last --seccomp (the one the Go parser keeps) says
// action=none, spelt "--seccomp action=none" or "--seccomp=action=none".
static int cvtpm_unconfined(int argc, char **argv) {
	const char *last = NULL;
	for (int i = 2; i < argc && argv[i] != NULL; i++) {
		if (strcmp(argv[i], "--seccomp") == 0 && i + 1 < argc && argv[i + 1] != NULL) {
			last = argv[++i];
		} else if (strncmp(argv[i], "--seccomp=", 10) == 0) {
			last = argv[i] + 10;
		}
	}
	return last != NULL && strcmp(last, "action=none") == 0;
}

// cvtpm_wants_runas says whether the drop-in's command line has swtpm's
// --runas (-r, also with its value joined: -rUSER, --runas=USER).
static int cvtpm_wants_runas(int argc, char **argv) {
	for (int i = 2; i < argc && argv[i] != NULL; i++) {
		if (strcmp(argv[i], "--runas") == 0 || strncmp(argv[i], "--runas=", 8) == 0 ||
			strncmp(argv[i], "-r", 2) == 0) {
			return 1;
		}
	}
	return 0;
}

// cvtpm_prepare_runas readies a drop-in that will change user (--runas,
// in Go: swtpmsocket's runAs) to keep no capability once it has: the
// kernel clears a process's effective and permitted capabilities when
// root becomes another user, unless SECBIT_NO_SETUID_FIXUP or
// SECBIT_KEEP_CAPS says otherwise (a service manager's SecureBits=), and
// it never clears the inheritable and ambient sets. Capabilities belong
// to threads, so this runs while the process has one. Each step may fail
// (a locked securebit, no CAP_SETPCAP); Go checks every thread's
// capabilities after the change and refuses to serve with any left.
static void cvtpm_prepare_runas(void) {
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	int bits = prctl(PR_GET_SECUREBITS, 0, 0, 0, 0);
	int keep = SECBIT_NO_SETUID_FIXUP | SECBIT_KEEP_CAPS;
	if (bits > 0 && (bits & keep) != 0) {
		prctl(PR_SET_SECUREBITS, bits & ~keep, 0, 0, 0);
	}
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	if (syscall(SYS_capget, &hdr, data) == 0) {
		data[0].inheritable = data[1].inheritable = 0;
		syscall(SYS_capset, &hdr, data);
	}
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
	int worker = 0, conn_fd = -1, key_fd = -1;
	const char *state_root = NULL;
	for (int i = 1; i < argc && argv != NULL && argv[i] != NULL; i++) {
		if (strcmp(argv[i], "--conn-fd") == 0) {
			worker = 1;
			if (i + 1 < argc && argv[i + 1] != NULL && argv[i + 1][0] >= '0' && argv[i + 1][0] <= '9') {
				conn_fd = atoi(argv[i + 1]);
			}
		}
		if (strcmp(argv[i], "--state-key-fd") == 0 && i + 1 < argc && argv[i + 1] != NULL &&
			argv[i + 1][0] >= '0' && argv[i + 1][0] <= '9') {
			key_fd = atoi(argv[i + 1]);
		}
		if (strcmp(argv[i], "--state-root") == 0 && i + 1 < argc) {
			state_root = argv[i + 1];
		} else if (strncmp(argv[i], "--state-root=", 13) == 0) {
			state_root = argv[i] + 13;
		}
	}
	if (!worker) {
		// The swtpm drop-in (cvtpm-swtpm socket, cvtpm socket): it closes
		// what it inherited and was not told to use once it serves
		// (DropInInherited), so record what that is; and unless told
		// --seccomp action=none, it gives up writing beneath /proc and
		// /sys now, while it has one thread (DropInLandlock).
		if (argc > 1 && argv != NULL && argv[1] != NULL && strcmp(argv[1], "socket") == 0) {
			cvtpm_record_inherited();
			if (cvtpm_wants_runas(argc, argv)) {
				cvtpm_prepare_runas();
			}
			if (!cvtpm_unconfined(argc, argv)) {
				cvtpm_no_writes_in_proc_sys();
			}
		}
		return;
	}
	cvtpm_close_inherited(conn_fd, key_fd);
	cvtpm_isolate_mounts(state_root);
	prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
	// Every thread started from here inherits it (the seccomp filter
	// needs it; it belongs to threads).
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
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
	"errors"
	"fmt"
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
	// The mount namespace comes first: without it (or the user namespace
	// a worker that is not root builds it in) the bounding set may not
	// have been droppable either.
	if e := C.cvtpm_mounts_result(); e != 0 {
		return fmt.Errorf("the worker could not isolate its view of the file system (%s): %w", C.GoString(C.cvtpm_mounts_failed_step()), syscall.Errno(e))
	}
	for c := range 64 {
		if in, err := unix.PrctlRetInt(unix.PR_CAPBSET_READ, uintptr(c), 0, 0, 0); err == nil && in == 1 {
			return fmt.Errorf("the worker kept capability %d in its bounding set", c)
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

// ErrNoLandlock: the kernel offers no Landlock (before Linux 5.13, or
// not in its lsm= list) or the process may not use it (a seccomp profile
// of its container that refuses the calls), so the drop-in could not give
// up writing beneath /proc and /sys.
var ErrNoLandlock = errors.New("confine: Landlock is not available to this process")

// DropInLandlock reports what the swtpm drop-in's constructor did, before
// the Go runtime started, about files beneath /proc and /sys: nil if the
// process (every thread of it) can no longer open one for writing, most
// of all /proc/self/mem, through which it could write its own code past
// the seccomp filter's refusal of executable memory. ok is false if it was
// not attempted (not a drop-in's command line, or --seccomp action=none).
func DropInLandlock() (ok bool, err error) {
	switch e := int(C.cvtpm_landlock_result()); {
	case e == -1:
		return false, nil
	case e == 0:
		return true, nil
	case C.cvtpm_landlock_none() != 0:
		return true, fmt.Errorf("%w (%s): %w", ErrNoLandlock, C.GoString(C.cvtpm_landlock_failed_step()), syscall.Errno(e))
	default:
		return true, fmt.Errorf("confining writes beneath /proc and /sys (%s): %w", C.GoString(C.cvtpm_landlock_failed_step()), syscall.Errno(e))
	}
}

// DropInInherited is the descriptors above stderr the process had when it
// was executed as a swtpm drop-in (its first argument "socket"), recorded
// before the Go runtime started. ok is false when they were not recorded
// (another command, or /proc/self/fd unreadable); an error says there were
// more than the record holds.
func DropInInherited() (fds []int, ok bool, err error) {
	n := int(C.cvtpm_inherited_n())
	switch {
	case n == -2:
		return nil, false, fmt.Errorf("the process inherited more than %d descriptors", C.CVTPM_MAX_INHERITED)
	case n < 0 && C.cvtpm_inherited_err() != 0:
		// Recorded nothing, for the drop-in's command line: a start with
		// every descriptor the limit allows in use (EMFILE), or no /proc.
		return nil, false, fmt.Errorf("listing the descriptors the process inherited (/proc/self/fd): %w", syscall.Errno(C.cvtpm_inherited_err()))
	case n < 0:
		return nil, false, nil
	}
	for i := range n {
		fds = append(fds, int(C.cvtpm_inherited_fd(C.int(i))))
	}
	return fds, true, nil
}
