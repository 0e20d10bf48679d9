package linkbench

import (
	"fmt"
	"os"
	"runtime"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// On this small VM a wake-up across CPUs costs an inter-processor
// interrupt to a halted vCPU (tens of microseconds), one within a CPU a
// context switch, and the scheduler moves the path's five processes
// between the two cases at will. CVTPM_BENCH_PIN places them, as it
// does for test/bench:
//
//	same  the bench process and everything it starts (swtpm, the cvtpm
//	      socket, backend, workers, relays, guest proxies) on the last
//	      CPU: the CPU each hop costs, without wake-up noise. Each Go
//	      process then sees one CPU and runs with GOMAXPROCS=1.
//	off   (default) no pinning: the hops pay the cross-CPU wake-ups.
//
// Pinning is set before this process's Go runtime starts (a re-exec with
// the CPU mask already set), so that the runtime and every process it
// starts size themselves for one CPU; the memory and creation benchmarks
// are run unpinned by make bench.
const pinnedEnv = "CVTPM_LINKBENCH_PINNED"

func TestMain(m *testing.M) {
	if err := pin(); err != nil {
		fmt.Fprintln(os.Stderr, "linkbench:", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

func pin() error {
	switch mode := os.Getenv("CVTPM_BENCH_PIN"); mode {
	case "", "off":
		return nil
	case "same":
	default:
		return fmt.Errorf("CVTPM_BENCH_PIN=%q: want same or off (cross is test/bench's only)", mode)
	}
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		return fmt.Errorf("reading the CPU affinity: %w", err)
	}
	if set.Count() == 1 {
		if os.Getenv(pinnedEnv) == "" {
			fmt.Println("linkbench: this process already runs on one CPU")
		}
		return nil
	}
	last := -1
	for i := range len(set) * 64 {
		if set.IsSet(i) {
			last = i
		}
	}
	// Affinity is per thread and survives execve: set it on the thread
	// that execs.
	runtime.LockOSThread()
	var one unix.CPUSet
	one.Set(last)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		return fmt.Errorf("pinning to CPU %d: %w", last, err)
	}
	fmt.Printf("linkbench: CVTPM_BENCH_PIN=same: this process and all it starts run on CPU %d\n", last)
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	return syscall.Exec(exe, os.Args, append(os.Environ(), pinnedEnv+"=1"))
}

// placement says where this run's processes were.
func placement() string {
	if os.Getenv(pinnedEnv) != "" {
		return "every process on one CPU (CVTPM_BENCH_PIN=same)"
	}
	return fmt.Sprintf("unpinned, %d CPUs", runtime.NumCPU())
}
