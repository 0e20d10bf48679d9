package swtpmsocket

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
)

// A process confined to one CPU gets two Ps, so that the data listener's
// accept loop runs in C; GOMAXPROCS in the environment is left as given.
func TestTuneRuntimeOnOneCPU(t *testing.T) {
	if os.Getenv("CVTPM_TUNE_CHILD") != "" {
		TuneRuntime()
		fmt.Printf("procs=%d\n", runtime.GOMAXPROCS(0))
		return
	}
	if _, err := exec.LookPath("taskset"); err != nil {
		t.Skip("no taskset")
	}
	for _, c := range []struct {
		env  []string
		want string
	}{
		{nil, "procs=2"},
		{[]string{"GOMAXPROCS=1"}, "procs=1"},
		{[]string{"GOMAXPROCS=3"}, "procs=3"},
	} {
		cmd := exec.Command("taskset", "-c", "0", os.Args[0], "-test.run", "^TestTuneRuntimeOnOneCPU$")
		cmd.Env = append(append(os.Environ(), "CVTPM_TUNE_CHILD=1"), c.env...)
		if c.env == nil {
			cmd.Env = append(filterEnv(os.Environ(), "GOMAXPROCS="), "CVTPM_TUNE_CHILD=1")
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v\n%s", c.env, err, out)
		}
		if !strings.Contains(string(out), c.want) {
			t.Errorf("on one CPU with %v: %s, want %s", c.env, strings.TrimSpace(string(out)), c.want)
		}
	}
}

func filterEnv(env []string, prefix string) []string {
	var out []string
	for _, e := range env {
		if !strings.HasPrefix(e, prefix) {
			out = append(out, e)
		}
	}
	return out
}
