package swtpmsocket

import (
	"bufio"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// runAs is swtpm's --runas: the process becomes the user spec names
// before it opens any file, so that its sockets, state, pid and log files
// belong to that user and a take-over of the process through the TPM
// command parser gets that user's rights, not root's.
//
// As swtpm: a name takes the user's uid and primary group from the user
// database and its supplementary groups from the group database
// (initgroups); a number is the uid, and the gid is the same number. Unlike
// swtpm, a number also drops the supplementary groups (swtpm keeps the
// caller's, root's group 0 among them). Names resolve through /etc/passwd
// and /etc/group only: the drop-in is linked statically and loads no NSS
// module, so a directory user (LDAP, sssd) needs its numeric uid.
//
// Once it has changed, no thread may hold a capability (effective,
// permitted, inheritable or ambient): the C constructor cleared the
// inheritable and ambient sets and the securebits that keep capabilities
// across the change while the process had one thread
// (internal/confine), and the kernel clears the rest as root becomes
// another user. A caller whose capabilities survive (a locked securebit,
// a non-root caller with CAP_SETUID) is refused, not served with them.
//
// Already running as that user (uid and gid), it changes nothing: a
// non-root caller that names itself is not refused.
func runAs(spec string) error {
	uid, gid, groups, err := lookupRunAs(spec)
	if err != nil {
		return fmt.Errorf("--runas %s: %w", spec, err)
	}
	if os.Getuid() == uid && os.Geteuid() == uid && os.Getgid() == gid && os.Getegid() == gid && uid != 0 {
		return checkThreadsRunAs(uid, gid)
	}
	// Groups first, then the gid, then the uid: once the uid is not 0 the
	// others can no longer change. Go applies each to every thread (with
	// cgo, through the C library's set*id broadcast).
	if err := syscall.Setgroups(groups); err != nil {
		return fmt.Errorf("--runas %s: setting supplementary groups %v: %w (changing user needs root)", spec, groups, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("--runas %s: setgid(%d): %w", spec, gid, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("--runas %s: setuid(%d): %w", spec, uid, err)
	}
	return checkThreadsRunAs(uid, gid)
}

// lookupRunAs resolves --runas's value to a uid, a gid and the
// supplementary groups. A number is read as swtpm reads it (strtoul):
// leading blanks and a plus sign are allowed.
func lookupRunAs(spec string) (uid, gid int, groups []int, err error) {
	num := strings.TrimPrefix(strings.TrimLeft(spec, " \t\n\v\f\r"), "+")
	if n, err := strconv.ParseUint(num, 10, 32); err == nil {
		if n == 1<<32-1 {
			return 0, 0, nil, fmt.Errorf("uid %d is not a user (it means \"unchanged\" to the kernel)", n)
		}
		return int(n), int(n), []int{}, nil
	} else if num != "" && strings.Trim(num, "0123456789") == "" {
		return 0, 0, nil, fmt.Errorf("uid outside the valid range: %w", err)
	}
	u, err := user.Lookup(spec)
	if err != nil {
		return 0, 0, nil, fmt.Errorf("%w (looked up in /etc/passwd)", err)
	}
	if uid, err = strconv.Atoi(u.Uid); err != nil {
		return 0, 0, nil, fmt.Errorf("user %s has uid %q: %w", spec, u.Uid, err)
	}
	if gid, err = strconv.Atoi(u.Gid); err != nil {
		return 0, 0, nil, fmt.Errorf("user %s has gid %q: %w", spec, u.Gid, err)
	}
	ids, err := u.GroupIds()
	if err != nil {
		return 0, 0, nil, fmt.Errorf("groups of user %s (from /etc/group): %w", spec, err)
	}
	groups = []int{}
	for _, id := range ids {
		g, err := strconv.Atoi(id)
		if err != nil {
			return 0, 0, nil, fmt.Errorf("user %s's group %q: %w", spec, id, err)
		}
		groups = append(groups, g)
	}
	return uid, gid, groups, nil
}

// checkThreadsRunAs confirms that every thread of the process now has
// uid and gid as its real, effective, saved and filesystem ids, and,
// unless uid is root's, no capability in any set. The Go runtime starts threads of its own before
// main; one left as root, or with a capability, would undo --runas.
func checkThreadsRunAs(uid, gid int) error {
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil || len(tasks) == 0 {
		return fmt.Errorf("--runas: cannot list this process's threads in /proc to confirm the change: %v", err)
	}
	want := map[string]string{
		"Uid:":    fmt.Sprintf("%d %d %d %d", uid, uid, uid, uid),
		"Gid:":    fmt.Sprintf("%d %d %d %d", gid, gid, gid, gid),
		"CapInh:": "0000000000000000",
		"CapPrm:": "0000000000000000",
		"CapEff:": "0000000000000000",
		"CapAmb:": "0000000000000000",
	}
	if uid == 0 { // --runas root: root keeps root's capabilities, as with swtpm
		for _, c := range []string{"CapInh:", "CapPrm:", "CapEff:", "CapAmb:"} {
			delete(want, c)
		}
	}
	for _, t := range tasks {
		f, err := os.Open(t)
		if err != nil {
			continue // the thread ended
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 2 {
				continue
			}
			w, ok := want[fields[0]]
			if !ok {
				continue
			}
			if got := strings.Join(fields[1:], " "); got != w {
				f.Close()
				thread := filepath.Base(filepath.Dir(t))
				if strings.HasPrefix(fields[0], "Cap") {
					return fmt.Errorf("--runas: thread %s still has capabilities after the change (%s %s): the caller keeps them across a change of user (securebits no-setuid-fixup or keep-caps locked, or a non-root caller with CAP_SETUID); start it without", thread, fields[0], got)
				}
				return fmt.Errorf("--runas: thread %s still has %s %s after the change", thread, fields[0], got)
			}
		}
		f.Close()
	}
	return nil
}
