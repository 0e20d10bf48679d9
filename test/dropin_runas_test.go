package test

import (
	"context"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// runAsStateDir is a state directory that another user can reach (a test's
// TempDir sits in a directory only its owner may enter).
func runAsStateDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cvtpm-runas")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func needRootAndNobody(t *testing.T) *user.User {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("--runas needs root")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skipf("no user nobody: %v", err)
	}
	return u
}

// TestDropInRunAs: `--runas nobody`, as swtpm takes it. The drop-in becomes
// nobody (every thread: real, effective, saved and filesystem ids), keeps no
// capability, has nobody's groups, serves commands, and the files it
// writes are nobody's. Its identity is swtpm's with the same command line.
func TestDropInRunAs(t *testing.T) {
	nobody := needRootAndNobody(t)
	ids := map[testenv.Impl][3]string{}
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			dir := runAsStateDir(t)
			srv := testenv.StartSocket(t, impl, testenv.Options{StateDir: dir, RunAs: "nobody"})
			conn, err := tpmsock.Dial(context.Background(), "unix", srv.DataPath)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			def := tpm2.NVDefineSpace{ // a state write, as nobody
				AuthHandle: tpm2.TPMRHOwner,
				PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
					NVIndex: 0x01500043, NameAlg: tpm2.TPMAlgSHA256, DataSize: 8,
					Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NT: tpm2.TPMNTOrdinary},
				}),
			}
			if _, err := def.Execute(conn); err != nil {
				t.Fatalf("NV_DefineSpace as nobody: %v\n%s", err, srv.Log)
			}
			pid := srv.Cmd.Process.Pid
			var got [3]string
			for i, field := range []string{"Uid", "Gid", "Groups"} {
				if got[i], err = testenv.ProcStatus(pid, field); err != nil {
					t.Fatal(err)
				}
			}
			ids[impl] = got
			want := func(id string) string { return strings.Repeat(id+"\t", 3) + id }
			if got[0] != want(nobody.Uid) || got[1] != want(nobody.Gid) {
				t.Errorf("Uid %q, Gid %q; want every id nobody's (%s, %s)", got[0], got[1], nobody.Uid, nobody.Gid)
			}
			for _, g := range strings.Fields(got[2]) {
				if g == "0" {
					t.Errorf("Groups %q still has root's group", got[2])
				}
			}
			tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/status")
			for _, task := range tasks {
				b, _ := os.ReadFile(task)
				for _, line := range strings.Split(string(b), "\n") {
					if f := strings.Fields(line); len(f) == 5 && f[0] == "Uid:" && strings.Join(f[1:], " ") != strings.Repeat(nobody.Uid+" ", 3)+nobody.Uid {
						t.Errorf("%s: %s", task, line)
					}
				}
			}
			if capEff, _ := testenv.ProcStatus(pid, "CapEff"); strings.Trim(capEff, "0") != "" {
				t.Errorf("CapEff %s: capabilities kept after --runas", capEff)
			}
			owned := 0
			filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
				if err != nil || !d.Type().IsRegular() {
					return err
				}
				fi, _ := d.Info()
				if st, ok := fi.Sys().(*syscall.Stat_t); ok && strconv.Itoa(int(st.Uid)) != nobody.Uid {
					t.Errorf("%s is owned by uid %d, not nobody", p, st.Uid)
				}
				owned++
				return nil
			})
			if owned == 0 {
				t.Errorf("no state file written in %s", dir)
			}
		})
	}
	if sw, cv := ids[testenv.Swtpm], ids[testenv.Cvtpm]; sw != cv {
		t.Errorf("identity under --runas nobody: swtpm Uid/Gid/Groups %q, cvtpm %q", sw, cv)
	}
}

// TestDropInRunAsNumeric: a numeric --runas is that uid with the gid of the
// same number, as swtpm; the drop-in also leaves root's supplementary
// groups behind, which swtpm 0.7 keeps.
func TestDropInRunAsNumeric(t *testing.T) {
	needRootAndNobody(t)
	srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: runAsStateDir(t), RunAs: "65534"})
	pid := srv.Cmd.Process.Pid
	for field, want := range map[string]string{"Uid": "65534\t65534\t65534\t65534", "Gid": "65534\t65534\t65534\t65534", "Groups": ""} {
		if got, err := testenv.ProcStatus(pid, field); err != nil || got != want {
			t.Errorf("%s: %q, %v; want %q", field, got, err, want)
		}
	}
}

// TestDropInRunAsRoot: --runas root (or 0) is root, as with swtpm: not
// refused for keeping root's capabilities.
func TestDropInRunAsRoot(t *testing.T) {
	needRootAndNobody(t)
	for _, who := range []string{"root", "0"} {
		srv := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: runAsStateDir(t), RunAs: who})
		if uid, err := testenv.ProcStatus(srv.Cmd.Process.Pid, "Uid"); err != nil || uid != "0\t0\t0\t0" {
			t.Errorf("--runas %s: Uid %q, %v", who, uid, err)
		}
	}
}

// TestDropInRunAsRefused: a user that does not exist, and a state directory
// the user may not write, end the start with an error naming them; swtpm
// refuses both too.
func TestDropInRunAsRefused(t *testing.T) {
	needRootAndNobody(t)
	for _, impl := range testenv.Both {
		for _, c := range []struct {
			name, user string
			private    bool // the state directory is root's, mode 0700
			want       string
		}{
			{"unknown user", "no-such-user-cvtpm", false, "no-such-user-cvtpm"},
			{"state directory not the user's", "nobody", true, "ermission denied"},
		} {
			t.Run(string(impl)+"/"+c.name, func(t *testing.T) {
				dir := runAsStateDir(t)
				if c.private {
					os.Chmod(dir, 0o700)
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				cmd := exec.CommandContext(ctx, testenv.Binary(t, impl), "socket", "--tpm2", "--tpmstate", "dir="+dir,
					"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl"), "--flags", "not-need-init,startup-clear", "--runas", c.user)
				out, err := cmd.CombinedOutput()
				if err == nil || ctx.Err() != nil {
					t.Fatalf("started (or hung: %v) with --runas %s: %v\n%s", ctx.Err(), c.user, err, out)
				}
				if impl == testenv.Cvtpm && !strings.Contains(string(out), c.want) {
					t.Errorf("error %q does not name %q", out, c.want)
				}
			})
		}
	}
}
