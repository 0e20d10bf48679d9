package test

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"cvtpm/test/testenv"
)

// TestLeanBinaries holds the two binaries that run once per TPM, the
// backend's cvtpm-worker and the swtpm drop-in cvtpm-swtpm, to what keeps
// them small (issue 13): libtpms and libcrypto linked statically (no
// per-process relocated pages, no dynamic loading at start), and none of
// the services' module graphs (gRPC, protobuf, PostgreSQL, OPA,
// go-tpm-tools) linked in.
func TestLeanBinaries(t *testing.T) {
	dir := filepath.Dir(testenv.Binary(t, testenv.Cvtpm))
	forbidden := []string{"google.golang.org/grpc", "google.golang.org/protobuf", "github.com/jackc/pgx",
		"github.com/open-policy-agent/opa", "github.com/google/go-tpm-tools", "go.etcd.io/bbolt"}
	for _, name := range []string{"cvtpm-worker", "cvtpm-swtpm"} {
		bin := filepath.Join(dir, name)
		t.Run(name, func(t *testing.T) {
			out, err := exec.Command("ldd", bin).CombinedOutput()
			if err != nil {
				t.Fatalf("ldd %s: %v\n%s", bin, err, out)
			}
			for _, lib := range []string{"libtpms", "libcrypto"} {
				if strings.Contains(string(out), lib) {
					t.Errorf("%s loads %s at run time; it should be linked statically (vtpm/engine/link_static.go):\n%s", name, lib, out)
				}
			}
			mods, err := exec.Command("go", "version", "-m", bin).CombinedOutput()
			if err != nil {
				t.Fatalf("go version -m %s: %v\n%s", bin, err, mods)
			}
			for _, m := range forbidden {
				if strings.Contains(string(mods), "\t"+m+"\t") || strings.Contains(string(mods), "\t"+m+"/") {
					t.Errorf("%s links %s, which a per-TPM process never uses", name, m)
				}
			}
			if !strings.Contains(string(mods), "build\t-buildmode=exe") {
				t.Errorf("%s is not a position-dependent executable (-buildmode=exe): its C code would be relocated per process", name)
			}
		})
	}
}
