package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/internal/sockmap"
	"cvtpm/test/testenv"
)

// The relay with --relay-join on (connections joined in the kernel): the
// guest proxy's sessions, the supervisor's and the direct one, work
// through it with tpm2-tools, large commands and responses included.
func TestGuestProxyThroughJoinedRelay(t *testing.T) {
	if j, err := sockmap.New(); err != nil {
		t.Skipf("no kernel join here: %v", err)
	} else {
		j.Close()
	}
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	relay := topo.StartPlainRelay(t, "--relay-join", "on")
	_, tcti := topo.StartGuestProxy(t, relay, "guest-vm1", "vm1", f.Policy)
	env := []string{"TPM2TOOLS_TCTI=" + tcti}
	dir := t.TempDir()
	run := func(args ...string) string { return testenv.Run(t, env, args[0], args[1:]...) }
	run("tpm2_startup", "-c")
	if out := run("tpm2_getrandom", "--hex", "16"); len(strings.TrimSpace(out)) != 32 {
		t.Fatalf("getrandom: %q", out)
	}
	run("tpm2_createek", "-c", filepath.Join(dir, "ek.ctx"), "-G", "rsa", "-u", filepath.Join(dir, "ek.pub"))
	run("tpm2_createak", "-C", filepath.Join(dir, "ek.ctx"), "-c", filepath.Join(dir, "ak.ctx"), "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u", filepath.Join(dir, "ak.pub"), "-f", "pem", "-n", filepath.Join(dir, "ak.name"))
	run("tpm2_flushcontext", "-t")
	run("tpm2_quote", "-c", filepath.Join(dir, "ak.ctx"), "-l", "sha256:0,1,2,3,4,5,6,7,16", "-q", "abcdef01", "-m", filepath.Join(dir, "q.msg"), "-s", filepath.Join(dir, "q.sig"), "-o", filepath.Join(dir, "q.pcrs"), "-g", "sha256")
	run("tpm2_checkquote", "-u", filepath.Join(dir, "ak.pub"), "-m", filepath.Join(dir, "q.msg"), "-s", filepath.Join(dir, "q.sig"), "-f", filepath.Join(dir, "q.pcrs"), "-g", "sha256", "-q", "abcdef01")
	// A 2 KiB NV index: commands and responses of several TCP segments.
	data := strings.Repeat("joined-relay-0123456789abcdef!\n", 70)[:2048]
	in := filepath.Join(dir, "nv.in")
	os.WriteFile(in, []byte(data), 0o600)
	run("tpm2_nvdefine", "0x1500020", "-C", "o", "-s", "2048", "-a", "ownerread|ownerwrite")
	run("tpm2_nvwrite", "0x1500020", "-C", "o", "-i", in)
	if got := run("tpm2_nvread", "0x1500020", "-C", "o", "-s", "2048"); got != data {
		t.Fatalf("nvread through the joined relay: %d bytes, differing", len(got))
	}
}
