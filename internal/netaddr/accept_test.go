package netaddr

import (
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
)

// flaky fails its first accepts with errno, then accepts.
type flaky struct {
	net.Listener
	fails int
	errno syscall.Errno
}

func (f *flaky) Accept() (net.Conn, error) {
	if f.fails > 0 {
		f.fails--
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", f.errno)}
	}
	return f.Listener.Accept()
}

func TestAcceptSurvivesDescriptorExhaustion(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go net.Dial("tcp", ln.Addr().String())
	c, err := Accept(&flaky{Listener: ln, fails: 3, errno: syscall.EMFILE}, nil)
	if err != nil {
		t.Fatalf("Accept after EMFILE: %v", err)
	}
	c.Close()
	ln.Close()
	if _, err := Accept(ln, nil); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept on a closed listener: %v", err)
	}
	if _, err := Accept(&flaky{Listener: ln, fails: 1, errno: syscall.EINVAL}, nil); err == nil {
		t.Fatal("a permanent error was retried")
	}
}
