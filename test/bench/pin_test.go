package bench

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"

	"golang.org/x/sys/unix"
)

// On a small VM, a round trip between two CPUs costs an inter-processor
// wake-up (about 50 us here) and one within a CPU does not (about 15 us); the
// scheduler moves processes between the two cases at will, which makes
// small-command latencies bimodal and ratios swing from 0.4 to 2.8. The
// latency benchmarks therefore pin the servers, and the client while it
// measures, to fixed CPUs. CVTPM_BENCH_PIN selects the placement:
//
//	same  (default) client and servers on the last CPU: measures the CPU cost
//	      of the server's path without wake-up noise
//	cross client on CPU 0, servers on the last CPU: the cross-CPU wake-up
//	      case (as QEMU and a vTPM on different CPUs)
//	off   no pinning
//
// A pinned Go server sees one CPU, so its runtime runs with GOMAXPROCS=1.
// Start-time and RSS benchmarks never pin.
type pinMode string

func benchPinMode() (pinMode, error) {
	m := pinMode(os.Getenv("CVTPM_BENCH_PIN"))
	switch m {
	case "":
		m = "same"
	case "same", "cross", "off":
	default:
		return "", fmt.Errorf("CVTPM_BENCH_PIN=%q: want same, cross or off", m)
	}
	if runtime.NumCPU() < 2 && m == "cross" {
		return "", fmt.Errorf("CVTPM_BENCH_PIN=cross needs two CPUs, have %d", runtime.NumCPU())
	}
	return m, nil
}

func cpuSetOf(cpu int) *unix.CPUSet {
	var s unix.CPUSet
	s.Set(cpu)
	return &s
}

// lastCPU is the highest CPU the test process may run on.
func lastCPU() (int, error) {
	var s unix.CPUSet
	if err := unix.SchedGetaffinity(0, &s); err != nil {
		return 0, fmt.Errorf("read CPU affinity: %w", err)
	}
	last := -1
	for i := 0; i < len(s)*64; i++ {
		if s.IsSet(i) {
			last = i
		}
	}
	if last < 0 {
		return 0, fmt.Errorf("empty CPU affinity")
	}
	return last, nil
}

// serverCPU is where pinned servers run, or -1 without pinning.
func serverCPU(m pinMode) (int, error) {
	if m == "off" {
		return -1, nil
	}
	return lastCPU()
}

// clientCPU is where the measuring client runs, or -1 without pinning.
func clientCPU(m pinMode) (int, error) {
	switch m {
	case "off":
		return -1, nil
	case "cross":
		return 0, nil
	}
	return lastCPU()
}

// startOnCPU starts cmd with its affinity set to cpu (cpu < 0: unchanged).
// The child inherits the affinity of the thread that forks it, so the fork
// happens on a locked thread pinned for the moment.
func startOnCPU(cmd *exec.Cmd, cpu int) error {
	if cpu < 0 {
		return cmd.Start()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return fmt.Errorf("read CPU affinity: %w", err)
	}
	if err := unix.SchedSetaffinity(0, cpuSetOf(cpu)); err != nil {
		return fmt.Errorf("pin to CPU %d: %w", cpu, err)
	}
	defer unix.SchedSetaffinity(0, &old)
	return cmd.Start()
}

// pinProcess sets the affinity of every thread of this process (threads
// created later inherit it from their creator) and returns a function that
// restores the previous affinity on all threads. cpu < 0 does nothing.
func pinProcess(cpu int) (restore func(), err error) {
	if cpu < 0 {
		return func() {}, nil
	}
	var old unix.CPUSet
	if err := unix.SchedGetaffinity(0, &old); err != nil {
		return nil, fmt.Errorf("read CPU affinity: %w", err)
	}
	if err := setAllThreads(cpuSetOf(cpu)); err != nil {
		setAllThreads(&old)
		return nil, fmt.Errorf("pin benchmark client to CPU %d: %w", cpu, err)
	}
	return func() { setAllThreads(&old) }, nil
}

func setAllThreads(s *unix.CPUSet) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return fmt.Errorf("list threads: %w", err)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, s); err != nil && err != unix.ESRCH {
			return fmt.Errorf("thread %d: %w", tid, err)
		}
	}
	return nil
}
