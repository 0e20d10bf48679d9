package testenv

import (
	"os/exec"
	"strconv"
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
