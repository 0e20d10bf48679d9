package pump

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func rvCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func rvFD(c net.Conn) int {
	var fd int
	raw, _ := c.(*net.TCPConn).SyscallConn()
	raw.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// Conditions a guest or the peer can put a pair in, each then left
// alone for a second: the pump thread must sleep, not spin.
func TestReviewPumpNoSpin(t *testing.T) {
	flood := func(c net.Conn) {
		buf := make([]byte, 64<<10)
		c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}
	cases := map[string]func(client, server net.Conn){
		"urgent byte, nobody reads it": func(client, server net.Conn) {
			unix.Send(rvFD(client), []byte("u"), unix.MSG_OOB)
		},
		"urgent bytes amid a flood the server does not read": func(client, server net.Conn) {
			flood(client)
			unix.Send(rvFD(client), []byte("u"), unix.MSG_OOB|unix.MSG_DONTWAIT)
		},
		"client floods, server never reads, client resets": func(client, server net.Conn) {
			flood(client)
			client.(*net.TCPConn).SetLinger(0)
			client.Close()
		},
		"server floods, client never reads, server resets": func(client, server net.Conn) {
			flood(server)
			server.(*net.TCPConn).SetLinger(0)
			server.Close()
		},
		"both flood, neither reads": func(client, server net.Conn) {
			go flood(server)
			flood(client)
		},
		"client shuts down its reading, server floods": func(client, server net.Conn) {
			client.(*net.TCPConn).SetReadBuffer(4096)
			unix.Shutdown(rvFD(client), unix.SHUT_RD)
			flood(server)
		},
		"server floods; client reads a little, then resets": func(client, server net.Conn) {
			go flood(server)
			client.Read(make([]byte, 100))
			time.Sleep(100 * time.Millisecond)
			client.(*net.TCPConn).SetLinger(0)
			client.Close()
		},
	}
	for name, do := range cases {
		t.Run(name, func(t *testing.T) {
			client, a, b, server := pair(t)
			start(t, context.Background(), a, b)
			do(client, server)
			time.Sleep(200 * time.Millisecond)
			c0 := rvCPU()
			time.Sleep(time.Second)
			used := rvCPU() - c0
			t.Logf("process CPU over 1 s: %v", used)
			if used > 150*time.Millisecond {
				t.Errorf("%v of CPU in 1 s with the pair idle", used)
			}
		})
	}
}
