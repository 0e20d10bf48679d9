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

// cvtpm_mkdirs creates base + path, component by component, with mode.
static int cvtpm_mkdirs(const char *base, const char *path, mode_t mode) {
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
		if (mkdir(buf, mode) != 0 && errno != EEXIST) {
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
	if (cvtpm_mkdirs(state_root, state_root, 0755) != 0 || cvtpm_mkdirs(state_root, "/.oldroot", 0755) != 0) {
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

// The drop-in's second Landlock layer: writes only where its command
// line says it writes. Access rights of Landlock's file system ABI.
#define CVTPM_LL_WRITE_FILE (1ULL << 1)
#define CVTPM_LL_REMOVE_DIR (1ULL << 4)
#define CVTPM_LL_REMOVE_FILE (1ULL << 5)
#define CVTPM_LL_MAKE_CHAR (1ULL << 6)
#define CVTPM_LL_MAKE_DIR (1ULL << 7)
#define CVTPM_LL_MAKE_REG (1ULL << 8)
#define CVTPM_LL_MAKE_SOCK (1ULL << 9)
#define CVTPM_LL_MAKE_FIFO (1ULL << 10)
#define CVTPM_LL_MAKE_BLOCK (1ULL << 11)
#define CVTPM_LL_MAKE_SYM (1ULL << 12)
#define CVTPM_LL_TRUNCATE (1ULL << 14) // ABI 3 (Linux 6.2)
#define CVTPM_LL_CREATE_RULESET_VERSION 1

// What the second layer did: -1 not attempted, 0 done, or the errno of
// the step that failed (cvtpm_named_step).
static int cvtpm_named_errno = -1;
static const char *cvtpm_named_step = "";
static char cvtpm_named_path[4096];
static int cvtpm_named_state_missing = 0;

static void cvtpm_named_fail(const char *step, const char *path) {
	cvtpm_named_errno = errno ? errno : EINVAL;
	cvtpm_named_step = step;
	snprintf(cvtpm_named_path, sizeof cvtpm_named_path, "%s", path ? path : "");
}

// cvtpm_param copies the value of key in an option value "k=v,k2,k3=v3"
// (swtpm's syntax, as vtpm/swtpmsocket parses it) to out, "" for a bare
// key; NULL if absent.
static const char *cvtpm_param(const char *val, const char *key, char *out, size_t n) {
	size_t kl = strlen(key);
	for (const char *p = val; p != NULL && *p;) {
		const char *e = strchr(p, ',');
		size_t l = e ? (size_t)(e - p) : strlen(p);
		if (l >= kl && strncmp(p, key, kl) == 0 && (l == kl || p[kl] == '=')) {
			size_t vl = l == kl ? 0 : l - kl - 1;
			if (vl >= n) {
				return NULL;
			}
			memcpy(out, p + l - vl, vl);
			out[vl] = 0;
			return out;
		}
		p = e ? e + 1 : NULL;
	}
	return NULL;
}

// cvtpm_parent copies the directory that holds path to out.
static void cvtpm_parent(const char *path, char *out, size_t n) {
	snprintf(out, n, "%s", path);
	size_t l = strlen(out);
	while (l > 1 && out[l - 1] == '/') {
		out[--l] = 0;
	}
	char *slash = strrchr(out, '/');
	if (slash == NULL) {
		snprintf(out, n, ".");
	} else if (slash == out) {
		out[1] = 0;
	} else {
		*slash = 0;
	}
}

// cvtpm_allow adds a rule granting rights beneath (or on) path; a file
// takes only the rights that apply to files. A path that cannot be opened
// gets no rule (the start then fails on it, naming it). 0, or -1 with the
// failure recorded.
static int cvtpm_allow(int rs, const char *path, uint64_t rights, uint64_t handled) {
	int fd = open(path, O_PATH | O_CLOEXEC);
	if (fd < 0) {
		return 0;
	}
	struct stat st;
	if (fstat(fd, &st) == 0 && !S_ISDIR(st.st_mode)) {
		rights &= CVTPM_LL_WRITE_FILE | CVTPM_LL_TRUNCATE;
	}
	struct cvtpm_landlock_path_beneath_attr pb = {rights & handled, fd};
	long r = pb.allowed_access ? syscall(CVTPM_SYS_landlock_add_rule, rs, CVTPM_LANDLOCK_RULE_PATH_BENEATH, &pb, 0) : 0;
	int e = errno;
	close(fd);
	if (r != 0) {
		errno = e;
		cvtpm_named_fail("adding a Landlock rule for", path);
		return -1;
	}
	return 0;
}

// cvtpm_allow_file lets the process write one file (create, write,
// truncate), which it may create first: a rule on a directory covers
// everything beneath it, so a file that exists gets a rule of its own and
// its directory none. One that does not is created here (empty, mode as
// Go would give it) unless the process will change user (--runas), which
// needs Go's create as that user: then its directory gets the rule.
static int cvtpm_allow_file(int rs, const char *path, mode_t mode, int runas, uint64_t handled) {
	char dir[4096];
	if (access(path, F_OK) != 0 && errno == ENOENT && !runas) {
		int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, mode);
		if (fd >= 0) {
			close(fd);
		}
	}
	if (access(path, F_OK) == 0) {
		return cvtpm_allow(rs, path, CVTPM_LL_WRITE_FILE | CVTPM_LL_TRUNCATE, handled);
	}
	cvtpm_parent(path, dir, sizeof dir);
	return cvtpm_allow(rs, dir, CVTPM_LL_MAKE_REG | CVTPM_LL_WRITE_FILE | CVTPM_LL_TRUNCATE, handled);
}

static int cvtpm_wants_runas(int argc, char **argv);

// The drop-in's paths, as the Go parser keeps them: the last of each.
struct cvtpm_named {
	char state[4096], server[4096], ctrl[4096], pid[4096], log[4096], key[2][4096];
};

// cvtpm_writes_only_where_named confines a drop-in (not --seccomp
// action=none) to writing where its command line says it writes: beneath
// its state directory (--tpmstate dir= or backend-uri=dir://, else
// TPM_PATH), created if missing; its pid and log files; its unix sockets'
// directories (create a socket; remove one, a stale one at start and its
// own at exit), the pid file's directory (remove it at exit), a key
// file's directory with remove=, and /dev/null. Every other file the user
// may write (other instances' state, the user's home) can no longer be
// created, written, truncated, renamed or removed. A second Landlock
// layer, on top of cvtpm_no_writes_in_proc_sys's, for the same reason
// done here: while the process has one thread.
static void cvtpm_writes_only_where_named(int argc, char **argv) {
	static const char *valued[] = {"server", "ctrl", "tpmstate", "flags", "pid", "log", "key", "migration-key",
		"migration", "locality", "seccomp", "mssim", "runas", "chroot", "port", "fd", NULL};
	static struct cvtpm_named nm;
	errno = 0;
	long abi = syscall(CVTPM_SYS_landlock_create_ruleset, NULL, 0, CVTPM_LL_CREATE_RULESET_VERSION);
	if (abi < 1) {
		cvtpm_named_fail("asking the Landlock ABI version", NULL);
		return;
	}
	uint64_t handled = CVTPM_LL_WRITE_FILE | CVTPM_LL_REMOVE_DIR | CVTPM_LL_REMOVE_FILE | CVTPM_LL_MAKE_CHAR |
		CVTPM_LL_MAKE_DIR | CVTPM_LL_MAKE_REG | CVTPM_LL_MAKE_SOCK | CVTPM_LL_MAKE_FIFO | CVTPM_LL_MAKE_BLOCK |
		CVTPM_LL_MAKE_SYM | (abi >= 3 ? CVTPM_LL_TRUNCATE : 0);
	memset(&nm, 0, sizeof nm);
	// A process that only answers a question (--print-states from
	// swtpm_setup, --print-capabilities, --help, --version) creates
	// nothing: no state directory, pid or log file made for it.
	int runas = cvtpm_wants_runas(argc, argv), query = 0;
	for (int i = 2; i < argc && argv[i] != NULL; i++) {
		const char *a = argv[i];
		query |= strcmp(a, "--print-states") == 0 || strcmp(a, "--print-capabilities") == 0 ||
			strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0 || strcmp(a, "--version") == 0 || strcmp(a, "-v") == 0;
	}
	runas |= query; // creates nothing, as under --runas
	char v[4096], t[64];
	for (int i = 2; i < argc && argv[i] != NULL; i++) {
		const char *a = argv[i], *name = NULL, *val = NULL;
		if (strncmp(a, "--", 2) != 0) {
			continue;
		}
		for (int k = 0; valued[k] != NULL; k++) {
			size_t l = strlen(valued[k]);
			if (strncmp(a + 2, valued[k], l) == 0 && (a[2 + l] == 0 || a[2 + l] == '=')) {
				name = valued[k];
				if (a[2 + l] == '=') {
					val = a + 3 + l;
				} else if (i + 1 < argc && argv[i + 1] != NULL) {
					val = argv[++i];
				}
				break;
			}
		}
		if (name == NULL || val == NULL) {
			continue;
		}
		if (strcmp(name, "tpmstate") == 0) {
			nm.state[0] = 0;
			if (cvtpm_param(val, "dir", v, sizeof v) && *v) {
				snprintf(nm.state, sizeof nm.state, "%s", v);
			} else if (cvtpm_param(val, "backend-uri", v, sizeof v) && strncmp(v, "dir://", 6) == 0) {
				snprintf(nm.state, sizeof nm.state, "%s", v + 6);
			}
		} else if (strcmp(name, "server") == 0 || strcmp(name, "ctrl") == 0) {
			char *dst = strcmp(name, "server") == 0 ? nm.server : nm.ctrl;
			dst[0] = 0;
			if (cvtpm_param(val, "type", t, sizeof t) && strcmp(t, "unixio") == 0 && cvtpm_param(val, "path", v, sizeof v) && *v) {
				snprintf(dst, sizeof nm.server, "%s", v);
			}
		} else if (strcmp(name, "pid") == 0) {
			nm.pid[0] = 0;
			if (cvtpm_param(val, "file", v, sizeof v) && *v) {
				snprintf(nm.pid, sizeof nm.pid, "%s", v);
			}
		} else if (strcmp(name, "log") == 0) {
			nm.log[0] = 0;
			if (cvtpm_param(val, "file", v, sizeof v) && *v && strcmp(v, "-") != 0) {
				snprintf(nm.log, sizeof nm.log, "%s", v);
			}
		} else if (strcmp(name, "key") == 0 || strcmp(name, "migration-key") == 0) {
			char *dst = nm.key[strcmp(name, "key") == 0 ? 0 : 1];
			dst[0] = 0;
			// remove as vtpm/swtpmsocket's paramBool reads it: bare, true, 1, yes.
			if (cvtpm_param(val, "remove", t, sizeof t) &&
				(!*t || strcmp(t, "true") == 0 || strcmp(t, "1") == 0 || strcmp(t, "yes") == 0) &&
				((cvtpm_param(val, "file", v, sizeof v) && *v) || (cvtpm_param(val, "pwdfile", v, sizeof v) && *v))) {
				snprintf(dst, sizeof nm.key[0], "%s", v);
			}
		}
	}
	if (!nm.state[0]) {
		const char *env = getenv("TPM_PATH");
		if (env != NULL) {
			snprintf(nm.state, sizeof nm.state, "%s", env);
		}
	}
	struct stat st;
	if (nm.state[0] && stat(nm.state, &st) != 0 && errno == ENOENT) {
		// A rule needs the directory itself (one on the directory above
		// would open its siblings, other instances' state), so it is
		// created here, as Go's MkdirAll would (mode 0750); not for a
		// process that will change user (it would be root's), nor
		// directly in / (the first layer covers only what / held at
		// start: Go refuses that with its reason). Then Go refuses.
		cvtpm_parent(nm.state, v, sizeof v);
		if (runas || strcmp(v, "/") == 0 || cvtpm_mkdirs(nm.state[0] == '/' ? "" : ".", nm.state, 0750) != 0) {
			cvtpm_named_state_missing = 1;
			return;
		}
	}
	struct cvtpm_landlock_ruleset_attr attr = {handled};
	int rs = syscall(CVTPM_SYS_landlock_create_ruleset, &attr, sizeof attr, 0);
	if (rs < 0) {
		cvtpm_named_fail("creating a Landlock ruleset", NULL);
		return;
	}
	int failed = cvtpm_allow(rs, "/dev/null", CVTPM_LL_WRITE_FILE, handled);
	if (!failed && nm.state[0]) {
		failed = cvtpm_allow(rs, nm.state, handled, handled);
	}
	const char *sockets[2] = {nm.server, nm.ctrl};
	for (int i = 0; !failed && i < 2; i++) {
		if (sockets[i][0]) {
			cvtpm_parent(sockets[i], v, sizeof v);
			failed = cvtpm_allow(rs, v, CVTPM_LL_MAKE_SOCK | CVTPM_LL_REMOVE_FILE, handled);
		}
	}
	if (!failed && nm.pid[0]) {
		failed = cvtpm_allow_file(rs, nm.pid, 0644, runas, handled);
		cvtpm_parent(nm.pid, v, sizeof v);
		failed = failed || cvtpm_allow(rs, v, CVTPM_LL_REMOVE_FILE, handled);
	}
	if (!failed && nm.log[0]) {
		failed = cvtpm_allow_file(rs, nm.log, 0640, runas, handled);
	}
	for (int i = 0; !failed && i < 2; i++) {
		if (nm.key[i][0]) {
			cvtpm_parent(nm.key[i], v, sizeof v);
			failed = cvtpm_allow(rs, v, CVTPM_LL_REMOVE_FILE, handled);
		}
	}
	if (failed) {
		close(rs);
		return;
	}
	if (syscall(CVTPM_SYS_landlock_restrict_self, rs, 0) != 0) {
		cvtpm_named_fail("landlock_restrict_self", NULL);
		close(rs);
		return;
	}
	close(rs);
	cvtpm_named_errno = 0;
}

static int cvtpm_named_state_is_missing(void) { return cvtpm_named_state_missing; }
static int cvtpm_named_result(void) { return cvtpm_named_errno; }
static const char *cvtpm_named_failed_step(void) { return cvtpm_named_step; }
static const char *cvtpm_named_failed_path(void) { return cvtpm_named_path; }

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
				if (cvtpm_landlock_errno == 0) {
					cvtpm_writes_only_where_named(argc, argv);
				}
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
// the Go runtime started, with Landlock: nil if the process (every thread
// of it) can no longer open a file beneath /proc or /sys for writing,
// most of all /proc/self/mem, through which it could write its own code
// past the seccomp filter's refusal of executable memory; and can create,
// write, truncate, rename or remove files only where its command line
// says it writes (its state directory, its sockets', pid file's and log
// file's directories, /dev/null). ok is false if it was not attempted
// (not a drop-in's command line, or --seccomp action=none).
func DropInLandlock() (ok bool, err error) {
	switch e := int(C.cvtpm_landlock_result()); {
	case e == -1:
		return false, nil
	case e == 0:
		if n := int(C.cvtpm_named_result()); n > 0 {
			what := C.GoString(C.cvtpm_named_failed_step())
			if p := C.GoString(C.cvtpm_named_failed_path()); p != "" {
				what += " " + p
			}
			return true, fmt.Errorf("confining writes to the paths the command line names (%s): %w", what, syscall.Errno(n))
		}
		return true, nil
	case C.cvtpm_landlock_none() != 0:
		return true, fmt.Errorf("%w (%s): %w", ErrNoLandlock, C.GoString(C.cvtpm_landlock_failed_step()), syscall.Errno(e))
	default:
		return true, fmt.Errorf("confining writes beneath /proc and /sys (%s): %w", C.GoString(C.cvtpm_landlock_failed_step()), syscall.Errno(e))
	}
}

// DropInStateDirMissing reports that the drop-in's constructor found no
// state directory where its command line names one (--tpmstate dir=,
// backend-uri=dir://, TPM_PATH) and did not create it (the process will
// change user, or the directory would be directly in /), and so did not
// confine its writes: a Landlock rule must name the directory itself, and
// one on the directory above would open its siblings, other instances'
// state among them. The drop-in refuses to start then; swtpm needs the
// directory to exist too.
func DropInStateDirMissing() bool {
	return C.cvtpm_named_state_is_missing() != 0
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
