package pump

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// pumpTIDs returns the threads waiting in poll(2): the pump threads (Go's
// own wait in epoll_wait or futex).
func pumpTIDs() []int {
	ents, _ := os.ReadDir("/proc/self/task")
	var tids []int
	for _, e := range ents {
		w, _ := os.ReadFile("/proc/self/task/" + e.Name() + "/wchan")
		if strings.Contains(string(w), "poll") && !strings.Contains(string(w), "epoll") {
			n, _ := strconv.Atoi(e.Name())
			tids = append(tids, n)
		}
	}
	return tids
}

// Signals that land on a pump thread (process-directed ones pick any
// thread that does not block them) run Go's handler on the thread's 64
// KiB stack, through needm: the process must survive them, and the
// copy go on.
func TestReviewPumpSignalsOnPumpThread(t *testing.T) {
	client, a, b, server := pair(t)
	start(t, context.Background(), a, b)
	usr := make(chan os.Signal, 1024)
	signal.Notify(usr, syscall.SIGUSR1)
	defer signal.Stop(usr)
	var tids []int
	for deadline := time.Now().Add(2 * time.Second); len(tids) == 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		tids = pumpTIDs()
	}
	if len(tids) == 0 {
		t.Skip("no thread found in poll(2)")
	}
	pid := os.Getpid()
	msg := make([]byte, 4<<20)
	rand.Read(msg)
	go client.Write(msg)
	stop := make(chan struct{})
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			for _, tid := range tids {
				for _, s := range []syscall.Signal{syscall.SIGCHLD, syscall.SIGWINCH, syscall.SIGURG, syscall.SIGUSR1, syscall.SIGPROF} {
					unix.Tgkill(pid, tid, s)
				}
			}
			time.Sleep(50 * time.Microsecond)
		}
	}()
	got := make([]byte, len(msg))
	server.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err := io.ReadFull(server, got)
	time.Sleep(time.Second) // and more signals while the thread idles in poll
	close(stop)
	go server.Write(msg[:1000])
	back := make([]byte, 1000)
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(client, back); err != nil || !bytes.Equal(back, msg[:1000]) {
		t.Fatalf("copy back after signals: %v", err)
	}
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("copy under signals: %v, equal %v", err, bytes.Equal(got, msg))
	}
	t.Logf("pump threads %v; %d SIGUSR1 delivered to Go", tids, len(usr))
}
