package pump

import (
	"context"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The stop eventfd is written by context.AfterFunc's goroutine, and
// closed by Run's defers once the thread has ended. AfterFunc's stop
// function does not wait for a callback that has already started, so
// when the pair ends on its own at the moment ctx ends, Run closes stop
// and returns while the callback's goroutine has yet to write: its
// write(2) lands on whatever descriptor took stop's number meanwhile (a
// guest's or the backend's socket in the relay: 8 bytes injected, or
// another pair's stop eventfd: that pair cut).
//
// The schedule is made deterministic with one P: the pair's end (the
// thread closing done's write end) and the canceller's wake-up are seen
// by the same netpoll, the canceller first; it cancels (AfterFunc puts
// f in runnext) and starts a goroutine that pushes f behind Run's
// goroutine. Run returns, its goroutine opens socket pairs until one
// gets stop's old number; then f runs.
func TestReviewStopWrittenAfterClose(t *testing.T) {
	prev := runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(prev)
	orig := startThread
	defer func() { startThread = orig }()

	hits := 0
	const rounds = 20
	for round := 0; round < rounds; round++ {
		_, a, b, _ := pair(t)
		var fds [4]int
		started := make(chan struct{})
		startThread = func(fa, fb, stop, done int) syscall.Errno {
			fds = [4]int{fa, fb, stop, done}
			close(started)
			return 0 // a "thread" that this test ends by hand
		}
		ctx, cancel := context.WithCancel(context.Background())

		type result struct {
			err    error
			reused [2]int // the socket pair whose one end has stop's old number
			soak   [][2]int
		}
		res := make(chan result, 1)
		go func() {
			err := Run(ctx, a.(*net.TCPConn), b.(*net.TCPConn))
			// Right away, without yielding: descriptors opened now take
			// the lowest free numbers, stop's among them.
			var r result
			r.err = err
			r.reused = [2]int{-1, -1}
			for i := 0; i < 64; i++ {
				sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
				if err != nil {
					break
				}
				r.soak = append(r.soak, [2]int{sp[0], sp[1]})
				if sp[0] == fds[2] {
					r.reused = [2]int{sp[0], sp[1]}
					break
				}
				if sp[1] == fds[2] {
					r.reused = [2]int{sp[1], sp[0]}
					break
				}
			}
			res <- r
		}()
		<-started

		// The canceller waits on a pipe of its own, in the netpoller.
		var x [2]int
		if err := unix.Pipe2(x[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
			t.Fatal(err)
		}
		xr := os.NewFile(uintptr(x[0]), "x")
		cdone := make(chan struct{})
		go func() {
			defer close(cdone)
			xr.Read(make([]byte, 1))
			cancel()       // f -> runnext
			go func() {}() // f -> behind Run's goroutine in the run queue
		}()
		time.Sleep(20 * time.Millisecond) // Run and the canceller parked in the netpoller

		// The "thread" ends the pair: closes its sockets and done's write
		// end; then the canceller's pipe, so that its goroutine comes
		// first out of the same netpoll.
		unix.Close(fds[0])
		unix.Close(fds[1])
		unix.Close(fds[3])
		unix.Close(x[1])

		r := <-res
		<-cdone
		time.Sleep(20 * time.Millisecond) // let the AfterFunc callback run
		xr.Close()
		if r.err != nil {
			t.Fatalf("Run: %v", r.err)
		}
		if r.reused[0] >= 0 {
			buf := make([]byte, 64)
			n, _ := unix.Read(r.reused[1], buf)
			if n > 0 {
				hits++
				t.Logf("round %d: stop's old number %d, now a socket opened after Run returned, received %d bytes %x from the ctx callback", round, fds[2], n, buf[:n])
			}
		}
		for _, sp := range r.soak {
			unix.Close(sp[0])
			unix.Close(sp[1])
		}
	}
	if hits > 0 {
		t.Fatalf("in %d of %d rounds Run's ctx callback wrote the stop eventfd's 8 bytes into a descriptor opened after Run returned (stop closed before the callback ran)", hits, rounds)
	}
}

// The same race with the real thread and no scheduling tricks beyond one
// P: the client closes (the thread half-closes the server's side and ends
// the pair), and the server, on seeing that EOF, cancels Run's context,
// as a relay shutting down at that moment would.
func TestReviewStopWrittenAfterCloseRealThread(t *testing.T) {
	for _, procs := range []int{1, 2} {
		rounds := 200
		if procs == 2 {
			rounds = 1000
		}
		prev := runtime.GOMAXPROCS(procs)
		hits := 0
		for round := 0; round < rounds; round++ {
			client, a, b, server := pair(t)
			ctx, cancel := context.WithCancel(context.Background())
			res := make(chan [][2]int, 1)
			go func() {
				Run(ctx, a.(*net.TCPConn), b.(*net.TCPConn))
				var soak [][2]int
				for i := 0; i < 8; i++ {
					sp, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
					if err != nil {
						break
					}
					soak = append(soak, [2]int{sp[0], sp[1]})
				}
				res <- soak
			}()
			go func() {
				server.Read(make([]byte, 1)) // EOF: the thread has ended the pair
				cancel()
			}()
			time.Sleep(time.Millisecond)
			client.Close()
			soak := <-res
			time.Sleep(2 * time.Millisecond)
			got := false
			for _, sp := range soak {
				buf := make([]byte, 64)
				for _, fd := range sp {
					if n, _ := unix.Read(fd, buf); n > 0 {
						got = true
					}
				}
				unix.Close(sp[0])
				unix.Close(sp[1])
			}
			if got {
				hits++
			}
			server.Close()
		}
		runtime.GOMAXPROCS(prev)
		if hits > 0 {
			t.Errorf("GOMAXPROCS=%d: in %d of %d rounds a socket opened after Run returned received the stop eventfd's write", procs, hits, rounds)
		} else {
			t.Logf("GOMAXPROCS=%d: no hit in %d rounds", procs, rounds)
		}
	}
}
