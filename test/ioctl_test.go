package test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"cvtpm/test/testenv"
)

func ioctl(tb testing.TB, srv *testenv.Server, args ...string) string {
	tb.Helper()
	return testenv.Run(tb, nil, "swtpm_ioctl", append([]string{"--unix", srv.CtrlPath}, args...)...)
}

// TestSwtpmIoctl drives the control channel with swtpm-tools' swtpm_ioctl.
func TestSwtpmIoctl(t *testing.T) {
	for _, impl := range testenv.Both {
		t.Run(string(impl), func(t *testing.T) {
			t.Parallel()
			srv := testenv.StartSocket(t, impl, testenv.Options{})
			caps := ioctl(t, srv, "-c")
			if !regexp.MustCompile(`ptm capability is 0x[0-9a-f]+`).MatchString(caps) {
				t.Fatalf("swtpm_ioctl -c: %q", caps)
			}
			var spec struct {
				TPMSpecification struct{ Family string } `json:"TPMSpecification"`
			}
			if err := json.Unmarshal([]byte(ioctl(t, srv, "--info", "1")), &spec); err != nil || spec.TPMSpecification.Family != "2.0" {
				t.Fatalf("--info 1: %+v, %v", spec, err)
			}
			var attrs struct {
				TPMAttributes struct{ Manufacturer string } `json:"TPMAttributes"`
			}
			if err := json.Unmarshal([]byte(ioctl(t, srv, "--info", "2")), &attrs); err != nil || attrs.TPMAttributes.Manufacturer == "" {
				t.Fatalf("--info 2: %+v, %v", attrs, err)
			}
			ioctl(t, srv, "-s")
			if !srv.Wait(5 * time.Second) {
				t.Fatalf("swtpm_ioctl -s did not end %s", impl)
			}
		})
	}
}

// TestStateBlobMigration saves permanent and volatile state from one
// instance with swtpm_ioctl --save and loads it into a second with --load;
// the second then has the first's NV contents. Every pair of
// implementations is tried, so blobs move between swtpm and cvtpm too.
func TestStateBlobMigration(t *testing.T) {
	for _, from := range testenv.Both {
		for _, to := range testenv.Both {
			t.Run(string(from)+"-to-"+string(to), func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				src := testenv.StartSocket(t, from, testenv.Options{})
				tt := tools{tb: t, tcti: src.TCTI(), dir: dir}
				value := []byte("migrated from " + string(from) + " to " + string(to))
				os.WriteFile(tt.path("v"), value, 0o600)
				size := strconv.Itoa(len(value))
				tt.run("tpm2_nvdefine", "0x1500020", "-C", "o", "-s", size, "-a", "ownerread|ownerwrite")
				tt.run("tpm2_nvwrite", "0x1500020", "-C", "o", "-i", tt.path("v"))
				// swtpm hands out state blobs of a running TPM only.
				ioctl(t, src, "--save", "permanent", filepath.Join(dir, "perm"))
				ioctl(t, src, "--save", "volatile", filepath.Join(dir, "vol"))

				dst := testenv.StartSocket(t, to, testenv.Options{})
				ioctl(t, dst, "--stop")
				ioctl(t, dst, "--load", "permanent", filepath.Join(dir, "perm"))
				ioctl(t, dst, "--load", "volatile", filepath.Join(dir, "vol"))
				ioctl(t, dst, "-i")
				tt.tcti = dst.TCTI()
				tt.run("tpm2_nvread", "0x1500020", "-C", "o", "-s", size, "-o", tt.path("out"))
				if got, _ := os.ReadFile(tt.path("out")); string(got) != string(value) {
					t.Fatalf("NV after --load = %q, want %q", got, value)
				}
			})
		}
	}
}

// Migration on shared storage, as libvirt runs swtpm for it: the source
// with --migration release-lock-outgoing, the destination on the same
// state directory with --migration incoming. The destination starts while
// the source holds the directory; it takes the lock only when the state
// arrives, which works once the source has handed over its last blob and
// not before.
func TestSharedStorageMigration(t *testing.T) {
	dir := t.TempDir()
	src := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: dir, ExtraArgs: []string{"--migration", "release-lock-outgoing"}})
	tt := tools{tb: t, tcti: src.TCTI(), dir: t.TempDir()}
	tt.run("tpm2_nvdefine", "0x1500040", "-C", "o", "-s", "6", "-a", "ownerread|ownerwrite")
	os.WriteFile(tt.path("v"), []byte("shared"), 0o600)
	tt.run("tpm2_nvwrite", "0x1500040", "-C", "o", "-i", tt.path("v"))

	dst := testenv.StartSocket(t, testenv.Cvtpm, testenv.Options{StateDir: dir, NoFlags: true, ExtraArgs: []string{"--migration", "incoming"}})
	// While the source holds the directory, the destination cannot take
	// the state (it retries for 3 s, then fails).
	ioctl(t, src, "--save", "volatile", tt.path("volatile"))
	if out, err := testenv.RunErr(nil, "swtpm_ioctl", "--unix", dst.CtrlPath, "--load", "volatile", tt.path("volatile")); err == nil {
		t.Fatalf("the destination took the state while the source held the directory: %s", out)
	}
	// The source hands over its last blob and releases the lock.
	ioctl(t, src, "--save", "savestate", tt.path("savestate"))
	ioctl(t, src, "--stop")
	if out, err := testenv.RunErr(nil, "swtpm_ioctl", "--unix", dst.CtrlPath, "--load", "volatile", tt.path("volatile")); err != nil {
		t.Fatalf("the destination could not take the state after the source released it: %v %s\nsource log:\n%s\ndestination log:\n%s", err, out, src.Log, dst.Log)
	}
	ioctl(t, dst, "-i")
	got := testenv.Run(t, []string{"TPM2TOOLS_TCTI=" + dst.TCTI()}, "tpm2_nvread", "0x1500040", "-C", "o")
	if got != "shared" {
		t.Fatalf("the destination reads %q", got)
	}
}
