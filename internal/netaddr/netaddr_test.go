package netaddr

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

func TestListenDial(t *testing.T) {
	for _, addr := range []string{"unix:" + filepath.Join(t.TempDir(), "s"), "tcp:127.0.0.1:0"} {
		ln, err := Listen(addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Write([]byte("hi"))
				c.Close()
			}
		}()
		dial := addr
		if strings.HasPrefix(addr, "tcp:") {
			dial = "tcp:" + ln.Addr().String()
		}
		c, err := Dial(context.Background(), dial)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2)
		if _, err := c.Read(buf); err != nil || string(buf) != "hi" {
			t.Fatalf("%s: read %q %v", addr, buf, err)
		}
		c.Close()
		ln.Close()
	}
}

// A bare HOST:PORT is TCP (the CA's and verifier's --listen took only
// that form, the link's only tcp:HOST:PORT; both are accepted everywhere).
func TestBareHostPort(t *testing.T) {
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ln.Addr().Network() != "tcp" {
		t.Fatalf("network %s", ln.Addr().Network())
	}
	for _, tc := range []struct{ in, want string }{
		{"tcp:127.0.0.1:7443", "127.0.0.1:7443"}, {"127.0.0.1:7443", "127.0.0.1:7443"}, {"[::1]:7443", "[::1]:7443"},
		{"unix:/run/ca.sock", "unix:/run/ca.sock"},
	} {
		if got, err := GRPCTarget(tc.in); err != nil || got != tc.want {
			t.Errorf("GRPCTarget(%q) = %q, %v", tc.in, got, err)
		}
	}
	if _, err := GRPCTarget("vsock:2:7443"); err == nil {
		t.Error("GRPCTarget(vsock) succeeded")
	}
}

func TestBadAddresses(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"127.0.0.1:notaport", "want unix:PATH"},
		{"tcp", "want unix:PATH"},
		{"vsock:x", "vsock port"},
		{"http:x", "want unix:PATH"},
	} {
		if _, err := Listen(tc.addr); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Listen(%q) = %v, want %q", tc.addr, err, tc.want)
		}
	}
	if _, err := Dial(context.Background(), "vsock:3"); err == nil || !strings.Contains(err.Error(), "vsock:CID:PORT") {
		t.Errorf("Dial(vsock:3) = %v", err)
	}
}
