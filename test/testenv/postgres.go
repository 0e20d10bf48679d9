package testenv

import (
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
)

// StartPostgres runs a throwaway PostgreSQL 15 from Debian's packages on a
// unix socket in a temporary directory and returns its connection string.
// As root, the server runs as the postgres user (it refuses root).
func StartPostgres(t testing.TB) string {
	t.Helper()
	bin := "/usr/lib/postgresql/15/bin"
	if _, err := os.Stat(filepath.Join(bin, "initdb")); err != nil {
		t.Fatal("PostgreSQL 15 is not installed: run 'make deps' (package postgresql)")
	}
	dir, err := os.MkdirTemp("", "cvtpm-pg")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	run := func(args ...string) {
		t.Helper()
		var cmd *exec.Cmd
		if os.Geteuid() == 0 {
			cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--"}, args...)...)
		} else {
			cmd = exec.Command(args[0], args[1:]...)
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("no postgres user: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		os.Chown(dir, uid, gid)
	}
	data := filepath.Join(dir, "data")
	run(filepath.Join(bin, "initdb"), "-D", data, "-A", "trust", "-U", "cvtpm", "--no-sync")
	run(filepath.Join(bin, "pg_ctl"), "-D", data, "-o", "-k "+dir+" -c listen_addresses='' -c fsync=off", "-w", "-l", filepath.Join(dir, "log"), "start")
	t.Cleanup(func() { run(filepath.Join(bin, "pg_ctl"), "-D", data, "-m", "immediate", "stop") })
	return "host=" + dir + " user=cvtpm dbname=postgres"
}
