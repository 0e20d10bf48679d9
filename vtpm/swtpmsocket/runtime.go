package swtpmsocket

import (
	"os"
	"runtime"
)

// TuneRuntime gives the process at least two Ps (GOMAXPROCS) unless
// GOMAXPROCS is set in its environment. Call it first in main.
//
// The data listener's accept loop runs in C, in one long cgo call
// (engine.ServeListener) that holds a P; with a single P, after each
// connection it hands back, every goroutine (the control channel's, say)
// would wait until sysmon took the P back, up to 10 ms, so swtpmproto
// serves the listener in Go instead, at 1.3-1.4x swtpm's cost for a
// connection per command. A process confined to one CPU (taskset, a
// cpuset) gets one P by default: it keeps the C loop with a second,
// which costs nothing while idle (its thread sleeps). Measured on one
// CPU, a connection per command: 65 us with one P, 47-50 us with two,
// swtpm 46-47 us.
func TuneRuntime() {
	if os.Getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) < 2 {
		runtime.GOMAXPROCS(2)
	}
}
