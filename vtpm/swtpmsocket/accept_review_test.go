package swtpmsocket

import (
	"bytes"
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// the drop-in hands its --server unix path to swtpmproto.Unpolled as
// the file Listener.Close removes. net.UnixListener never unlinks an
// abstract name (a path starting with '@', which Go binds in the abstract
// namespace: no file is created); Listener.Close calls os.Remove on it all
// the same, deleting whatever file of that name is in the drop-in's
// working directory. Before a009ee1 the data listener was a
// net.UnixListener and left it alone, as the --ctrl listener still does.
func TestAcceptReviewAbstractServerPathRemovesFile(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	tag := strconv.Itoa(os.Getpid())
	data, ctrl := "@cvtpm-review-data-"+tag, "@cvtpm-review-ctrl-"+tag
	for _, name := range []string{data, ctrl} {
		if err := os.WriteFile(name, []byte("not the drop-in's"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pid := filepath.Join(dir, "pid")
	cfg, err := parseSocketArgs([]string{"--tpm2", "--tpmstate", "dir=" + filepath.Join(dir, "state"),
		"--server", "type=unixio,path=" + data, "--ctrl", "type=unixio,path=" + ctrl,
		"--flags", "not-need-init,startup-clear", "--pid", "file=" + pid, "--log", "file=-"}, os.Getenv)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveSocket(context.Background(), cfg) }()
	for range 500 {
		if _, err := os.Stat(pid); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c, err := net.Dial("unix", data) // the abstract socket
	if err != nil {
		t.Fatalf("data socket: %v", err)
	}
	c.Write([]byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8})
	resp := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(resp); err != nil || n != 20 {
		t.Fatalf("GetRandom: % x, %v", resp[:n], err)
	}
	c.Close()
	cc, err := net.Dial("unix", ctrl)
	if err != nil {
		t.Fatal(err)
	}
	cc.Write([]byte{0, 0, 0, 3}) // CMD_SHUTDOWN
	cc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, _ := cc.Read(resp); n != 4 || !bytes.Equal(resp[:4], []byte{0, 0, 0, 0}) {
		t.Errorf("SHUTDOWN reply % x", resp[:n])
	}
	cc.Close()
	if err := <-done; err != nil {
		t.Fatalf("serveSocket: %v", err)
	}
	for _, name := range []string{ctrl, data} {
		if _, err := os.Stat(name); err != nil {
			t.Errorf("%s in the working directory, a file the drop-in did not create (its socket is abstract), after shutdown: %v", name, err)
		}
	}
}
