package engine

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// voluntarySwitches reads how often thread tid of this process has gone to
// sleep (voluntary_ctxt_switches in /proc/self/task/TID/status).
func voluntarySwitches(t *testing.T, tid int) int {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/self/task/%d/status", tid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "voluntary_ctxt_switches:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no voluntary_ctxt_switches for thread %d", tid)
	return 0
}

// TestServeStreamSleepsOncePerCommand: the stream loop's thread sleeps once
// per command, waiting for it, when the client pauses between commands as
// real clients do (go-tpm marshals the next one, QEMU runs the guest).
// Blocked in read(2) on a unix socket it also woke, and slept again, each
// time the client took an answer off the socket (the kernel's write-space
// wake-up): about two sleeps per command.
func TestServeStreamSleepsOncePerCommand(t *testing.T) {
	tpm := startTPM(t, newMem())
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	server, client := fds[0], fds[1]
	defer unix.Close(server)
	var stop atomic.Int32
	tids := make(chan int, 1)
	served := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the loop runs on this thread; count its sleeps
		defer runtime.UnlockOSThread()
		tids <- unix.Gettid()
		_, err := tpm.ServeStream(server, nil, 4096, false, false, &stop)
		served <- err
	}()
	tid := <-tids

	getRandom := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
	roundTrip := func() {
		t.Helper()
		if _, err := unix.Write(client, getRandom); err != nil {
			t.Fatal(err)
		}
		var rsp []byte
		buf := make([]byte, 64)
		for len(rsp) < 20 {
			n, err := unix.Read(client, buf)
			if err != nil || n == 0 {
				t.Fatalf("reading the answer: %d bytes, %v", n, err)
			}
			rsp = append(rsp, buf[:n]...)
		}
		if len(rsp) != 20 || !bytes.Equal(rsp[6:10], []byte{0, 0, 0, 0}) {
			t.Fatalf("GetRandom answered % x", rsp)
		}
	}
	for range 5 { // the loop is running and past its first allocations
		roundTrip()
	}
	const commands = 200
	before := voluntarySwitches(t, tid)
	for range commands {
		roundTrip()
		time.Sleep(100 * time.Microsecond) // the client's own work
	}
	sleeps := voluntarySwitches(t, tid) - before
	unix.Close(client)
	if err := <-served; err != nil {
		t.Fatalf("ServeStream: %v", err)
	}
	t.Logf("%d commands: the serving thread slept %d times", commands, sleeps)
	if sleeps > commands*3/2 {
		t.Errorf("the serving thread slept %d times for %d commands; want about one per command (a wait that wakes when the client reads its answer sleeps twice)", sleeps, commands)
	}
}
