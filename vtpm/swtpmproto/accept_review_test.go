package swtpmproto

import (
	"context"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// Tests from an adversarial review of the data listener served in C
// (engine.ServeListener, serveListenerInC, Listener), each of which
// reproduced a finding, fixed since: a Listener told only one of two
// ServeData calls of its Close, and the EMFILE back-off was never
// reset on the C path; A-4 (an abstract socket name unlinked as a
// file) is in vtpm/swtpmsocket. Not fixed: the C loops learn of a
// stop through context.AfterFunc's goroutine, so a command completed after
// cancel() returned but before that goroutine ran is still executed (the
// engine's lock orders it before Stop and Close); the Go path checks ctx
// itself. accept_probe_test.go holds the probes that held up.

// Listener keeps a single onClose hook, "in place of any earlier f",
// and each serveListenerInC removes whatever hook is set when it returns.
// With two ServeData calls on one Listener (a net.Listener may be served
// by several accept loops), a Close tells only the loop that registered
// last; the other, whose C call was given a one-hour timeout because a
// Listener "tells of its Close at once", keeps its duplicate of the socket
// accepting and answering for up to an hour after Close (and after the
// unix socket's file is removed, for a TCP port).
func TestAcceptReviewTwoServeDataOneListener(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		tpm := startedEngine(t)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ul, err := Unpolled(ln, "")
		if err != nil {
			t.Fatal(err)
		}
		srv := New(tpm, paths)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 2)
		for range 2 {
			go func() { done <- srv.ServeData(ctx, ul, false) }()
		}
		returned := 0
		defer func() {
			cancel()
			for ; returned < 2; returned++ {
				<-done
			}
			srv.Wait()
		}()
		time.Sleep(100 * time.Millisecond) // both in their accept loops
		for range 4 {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			if got := dataRoundTrip(t, c, tpm2GetRandom8); len(got) != 20 || rcOf(got) != 0 {
				t.Fatalf("GetRandom: % x", got)
			}
			c.Close()
		}
		if err := ul.Close(); err != nil {
			t.Fatal(err)
		}
		timeout := time.After(2 * time.Second)
	wait:
		for returned < 2 {
			select {
			case <-done:
				returned++
			case <-timeout:
				break wait
			}
		}
		if returned < 2 {
			t.Errorf("%d of 2 ServeData calls on the Listener still running 2 s after its Close", 2-returned)
		}
		answered := 0
		for range 5 {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				continue
			}
			c.SetReadDeadline(time.Now().Add(time.Second))
			c.Write(tpm2GetRandom8)
			if n, _ := c.Read(make([]byte, 64)); n > 0 {
				answered++
			}
			c.Close()
		}
		if answered > 0 {
			t.Errorf("the closed Listener's port still accepts and answers: %d of 5 commands answered 2 s after Close", answered)
		}
	})
}

func exhaustFDs(t *testing.T) (restore func()) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Skip(err)
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip(err)
	}
	maxFD := 0
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			maxFD = max(maxFD, n)
		}
	}
	lim := old
	lim.Cur = uint64(maxFD + 1)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Skip(err)
	}
	var dummies []int
	for range 3 { // and again for any the server closes meanwhile
		for {
			d, err := syscall.Dup(0)
			if err != nil {
				break
			}
			dummies = append(dummies, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return func() {
		for _, d := range dummies {
			syscall.Close(d)
		}
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)
	}
}

// the accept loop's EMFILE pause (netaddr.AcceptPause: 5 ms, doubling
// to 1 s) is reset only when a connection comes back to Go (a hand-off);
// the Go path resets it at every accepted connection. Connections served
// inline in C never reset it, so after one long EMFILE episode every later
// accept failure, however brief, stops the listener for a full second
// (the Go path: 5 ms). A local client that can push the process to its
// descriptor limit for a moment (it holds connections; each idle one costs
// the server a descriptor) then takes the data channel away from every
// other client for a second each time.
func TestAcceptReviewEMFILEPauseNeverResets(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		srv, addr, cancel, done := serveEngine(t, "unix", paths)
		defer func() { cancel(); <-done; srv.Wait() }()
		getRandomOn(t, addr)
		// episode makes the server's accept fail for d, then returns how
		// long after that a client waiting since is answered.
		episode := func(d time.Duration) time.Duration {
			fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer syscall.Close(fd)
			restore := exhaustFDs(t)
			if err := syscall.Connect(fd, &syscall.SockaddrUnix{Name: addr}); err != nil {
				restore()
				t.Fatal(err)
			}
			syscall.Write(fd, tpm2GetRandom8)
			time.Sleep(d)
			if n, _, _ := syscall.Recvfrom(fd, make([]byte, 64), syscall.MSG_DONTWAIT|syscall.MSG_PEEK); n > 0 {
				restore()
				t.Fatal("answered during the episode: accept did not fail")
			}
			restore()
			start := time.Now()
			syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &syscall.Timeval{Sec: 5})
			// A read bounded by SO_RCVTIMEO is not restarted after a signal
			// (the Go runtime preempts with SIGURG; often under -race).
			n, err := syscall.Read(fd, make([]byte, 64))
			for err == syscall.EINTR {
				n, err = syscall.Read(fd, make([]byte, 64))
			}
			if n != 20 {
				t.Fatalf("client waiting through EMFILE: %d bytes, %v", n, err)
			}
			return time.Since(start)
		}
		episode(2500 * time.Millisecond) // the pause grows to 1 s
		for range 20 {
			getRandomOn(t, addr) // connection per command: served, not handed off
		}
		took := episode(20 * time.Millisecond)
		t.Logf("after a 20 ms EMFILE episode, a waiting client was answered %v later", took)
		if took > 300*time.Millisecond {
			t.Errorf("a 20 ms EMFILE episode, long after the server recovered from an earlier one, kept the listener from serving for %v more", took)
		}
	})
}
