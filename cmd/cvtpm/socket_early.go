package main

// `cvtpm socket` becomes bin/cvtpm-swtpm before this binary's Go runtime
// starts: a C constructor runs before the runtime and every package's
// init (gRPC's, the protobuf registries', the CA's), which take this
// 41 MB binary 6-7 ms, more than the drop-in's whole start. It execs the
// sibling that runSocket would (the checks of trustedSibling, in C), so
// the PID, the arguments, the environment and every inherited descriptor
// stay; when it cannot, it returns and runSocket serves as before.

/*
#define _GNU_SOURCE
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

__attribute__((constructor)) static void cvtpm_socket_early(int argc, char **argv, char **envp) {
	if (argc < 2 || argv == NULL || argv[1] == NULL || strcmp(argv[1], "socket") != 0) {
		return;
	}
	const char *lean = getenv("CVTPM_SOCKET_LEAN");
	if (lean != NULL && strcmp(lean, "off") == 0) {
		return;
	}
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
	if (n <= 0) {
		return;
	}
	exe[n] = '\0';
	struct stat self, st;
	if (stat(exe, &self) != 0) {
		return;
	}
	char *slash = strrchr(exe, '/');
	if (slash == NULL) {
		return;
	}
	static char path[PATH_MAX];
	int len = snprintf(path, sizeof path, "%.*s/cvtpm-swtpm", (int)(slash - exe), exe);
	if (len < 0 || len >= (int)sizeof path) {
		return;
	}
	// A regular, executable file that only its owner may write, owned by
	// root or by this binary's owner, and so is the directory entry
	// itself: a symlink another user planted is refused (trustedSibling).
	struct stat entry;
	if (lstat(path, &entry) != 0 || (entry.st_uid != 0 && entry.st_uid != self.st_uid)) {
		return;
	}
	if (stat(path, &st) != 0 || !S_ISREG(st.st_mode) || (st.st_mode & 0111) == 0 || (st.st_mode & 022) != 0) {
		return;
	}
	if (st.st_uid != 0 && st.st_uid != self.st_uid) {
		return;
	}
	argv[0] = path;
	execve(path, argv, envp);
	// Only a failed exec returns: Go serves.
}
*/
import "C"
