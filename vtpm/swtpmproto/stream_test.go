package swtpmproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/engine"
)

var (
	// TPM2_GetCapability(TPM_CAP_ALGS, 1, 127) and TPM2_PCR_Read(sha256:0):
	// answers that do not change between runs.
	tpm2GetCapAlgs = []byte{0x80, 0x01, 0, 0, 0, 22, 0, 0, 0x01, 0x7a, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x7f}
	tpm2PCRRead0   = []byte{0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 1, 0, 0}
)

// prefixedCmd puts the TPM_SEND_COMMAND prefix at locality loc before cmd.
func prefixedCmd(loc byte, cmd []byte) []byte {
	b := []byte{0, 0, 0, 8, loc}
	b = binary.BigEndian.AppendUint32(b, uint32(len(cmd)))
	return append(b, cmd...)
}

// readReply reads one answer from c: a TPM response, or with prefixed its
// size | response | u32 0 form.
func readReply(t *testing.T, c net.Conn, prefixed bool) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	head := 10
	if prefixed {
		head = 4
	}
	b := make([]byte, head)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading an answer: %v", err)
	}
	var rest int
	if prefixed {
		rest = int(binary.BigEndian.Uint32(b)) + 4
	} else {
		rest = int(binary.BigEndian.Uint32(b[2:])) - 10
	}
	if rest < 0 || rest > 8192 {
		t.Fatalf("answer header % x", b)
	}
	b = append(b, make([]byte, rest)...)
	if _, err := io.ReadFull(c, b[head:]); err != nil {
		t.Fatalf("reading an answer: %v", err)
	}
	return b
}

// initedServer is cvtpmServerWith whose TPM has been through CMD_INIT and
// TPM2_Startup, with its control connection (closed when the test ends).
func initedServer(t *testing.T, opts Options) (srv *Server, ctrl *net.UnixConn, dataPath string) {
	t.Helper()
	srv, ctrlPath, dataPath := cvtpmServerWith(t, opts)
	ctrl, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctrl.Close() })
	roundTrip(t, ctrl, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	d, err := net.Dial("unix", dataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	d.Write(tpm2StartupClr)
	readReply(t, d, false)
	return srv, ctrl, dataPath
}

// The engine's C stream loop (engine.ServeStream) and the Go path answer
// the same script byte for byte: raw and prefixed commands, localities,
// a stopped TPM, pipelined commands, QEMU's CMD_SET_DATAFD connection.
func TestStreamLoopMatchesGoPath(t *testing.T) {
	run := func(t *testing.T, opts Options) (replies [][]byte, streamed uint64) {
		opts.RejectLocality4 = true
		srv, ctrl, dataPath := cvtpmServerWith(t, opts)
		c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrl, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		control := func(m []byte) { replies = append(replies, roundTrip(t, c, m, -1)) }
		control(ctrlMsg(CmdInit, 0, 0, 0, 0))
		d, err := net.Dial("unix", dataPath)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		data := func(cmds ...[]byte) {
			if _, err := d.Write(bytes.Join(cmds, nil)); err != nil {
				t.Fatal(err)
			}
			for _, cmd := range cmds {
				replies = append(replies, readReply(t, d, binary.BigEndian.Uint32(cmd) == tpmSendCommand))
			}
		}
		data(prefixedCmd(0, tpm2StartupClr))
		data(tpm2StartupClr) // TPM_RC_INITIALIZE
		data(prefixedCmd(7, tpm2GetRandom8))
		data(prefixedCmd(4, tpm2GetRandom8)) // TPM_RC_LOCALITY: rejected
		data(tpm2GetCapAlgs)
		data([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x0f, 0xff}) // no such command
		data(tpm2PCRRead0)
		control(ctrlMsg(CmdSetLocality, 3))
		data(tpm2GetCapAlgs, prefixedCmd(2, tpm2PCRRead0), tpm2GetRandom8) // pipelined
		control(ctrlMsg(CmdStop))
		data(tpm2GetRandom8) // a stopped TPM: TPM_RC_FAILURE
		control(ctrlMsg(CmdInit, 0, 0, 0, 0))
		data(tpm2StartupClr, tpm2GetCapAlgs)
		replies = append(replies, qemuSequence(t, ctrl)...)
		// Random bytes differ: keep GetRandom's header only.
		for i, r := range replies {
			if len(r) == 20 && binary.BigEndian.Uint32(r[2:]) == 20 {
				replies[i] = r[:10]
			}
		}
		return replies, srv.streamsServed.Load()
	}
	var want, got [][]byte
	t.Run("go", func(t *testing.T) {
		var streamed uint64
		if want, streamed = run(t, Options{NoStreamLoop: true}); streamed != 0 {
			t.Fatalf("NoStreamLoop: %d connections went to the stream loop", streamed)
		}
	})
	t.Run("stream loop", func(t *testing.T) {
		var streamed uint64
		// The kept data connection and QEMU's both end in the loop.
		if got, streamed = run(t, Options{}); streamed != 2 {
			t.Errorf("%d connections served by the stream loop, want 2", streamed)
		}
	})
	if len(got) != len(want) {
		t.Fatalf("%d replies from the stream loop, %d from the Go path", len(got), len(want))
	}
	for i := range want {
		if !bytes.Equal(got[i], want[i]) {
			t.Errorf("reply %d: stream loop % x, Go path % x", i, got[i], want[i])
		}
	}
}

// A stream that turns into bytes that cannot be a command, or ends within
// one, is closed; the server goes on serving.
func TestStreamLoopBadBytes(t *testing.T) {
	srv, _, dataPath := initedServer(t, Options{})
	tests := []struct {
		name  string
		bytes []byte
	}{
		{"size below a header", []byte{0x80, 0x01, 0, 0, 0, 5, 0, 0, 1, 0x7b}},
		{"size above the buffer", []byte{0x80, 0x01, 0, 1, 0, 0, 0, 0, 1, 0x7b}},
		{"prefix with size 0", []byte{0, 0, 0, 8, 0, 0, 0, 0, 0}},
		{"half a command, then close", tpm2GetRandom8[:7]},
	}
	for _, tc := range tests {
		before := srv.streamsServed.Load()
		d, err := net.Dial("unix", dataPath)
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			d.Write(tpm2GetRandom8)
			if r := readReply(t, d, false); rcOf(r) != 0 {
				t.Fatalf("%s: GetRandom: % x", tc.name, r)
			}
		}
		d.Write(tc.bytes)
		if tc.name == "half a command, then close" {
			d.(*net.UnixConn).CloseWrite()
		}
		d.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := d.Read(make([]byte, 64)); !errors.Is(err, io.EOF) {
			t.Errorf("%s: read %d bytes, %v; want the server to close", tc.name, n, err)
		}
		d.Close()
		if srv.streamsServed.Load() == before {
			t.Errorf("%s: the connection did not reach the stream loop", tc.name)
		}
		getRandomOn(t, dataPath)
	}
}

// Clients that keep connections open and never read their answers hold
// at most maxStreams threads in the stream loop; the rest are served in
// Go, and the server stops with every one of them blocked.
func TestStreamLoopBounded(t *testing.T) {
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if rc := tpm.Init(0); rc != 0 {
		t.Fatalf("Init: %#x", rc)
	}
	tpm.Execute(nil, tpm2StartupClr)
	srv, ln, cancel, done := reviewServe(t, tpm, "unix", Options{})
	path := ln.Addr().String()
	before := threads()
	const n = 3 * maxStreams
	var conns []net.Conn
	var wg sync.WaitGroup
	for range n {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		// One command answered and read, so the connection is kept...
		c.Write(tpm2GetRandom8)
		readReply(t, c, false)
		// ...then commands whose answers nobody reads, until the
		// server's and the client's socket buffers are full.
		wg.Add(1)
		go func() {
			defer wg.Done()
			many := bytes.Repeat(tpm2GetRandom8, 4096)
			for {
				if _, err := c.Write(many); err != nil {
					return
				}
			}
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for srv.streams.Load() < maxStreams && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if got := srv.streams.Load(); got != maxStreams {
		t.Errorf("%d connections in the stream loop, want the bound %d", got, maxStreams)
	}
	if grown := threads() - before; grown > maxStreams+20 {
		t.Errorf("%d clients that never read: %d more threads", n, grown)
	}
	// A new client is still answered (in Go).
	getRandomOn(t, path)
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("ServeData did not return with blocked clients")
	}
	stopped := make(chan struct{})
	go func() { srv.Wait(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("connections still served 10 s after the stop")
	}
	for _, c := range conns {
		c.Close()
	}
	wg.Wait()
	if got := srv.streams.Load(); got != 0 {
		t.Errorf("%d stream slots still taken after the stop", got)
	}
}

// A stop reaches a stream loop waiting for its client's next command.
func TestStreamLoopStopWhileIdle(t *testing.T) {
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	tpm.Init(0)
	srv, ln, cancel, done := reviewServe(t, tpm, "unix", Options{})
	c, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 3 {
		c.Write(tpm2StartupClr)
		readReply(t, c, false)
	}
	if srv.streams.Load() != 1 {
		t.Fatalf("%d connections in the stream loop, want 1", srv.streams.Load())
	}
	ctx, stop := context.WithTimeout(context.Background(), 10*time.Second)
	defer stop()
	cancel()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("ServeData did not return")
	}
	waited := make(chan struct{})
	go func() { srv.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-ctx.Done():
		t.Fatal("the stream loop did not end at the stop")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("client read after the stop: %v, want EOF", err)
	}
}

// A Listener (the drop-in's data socket, out of the netpoller) serves in
// both paths; closing it ends ServeData, refuses new connections and
// removes the socket's file; Accept works through a registered duplicate.
func TestUnpolledListener(t *testing.T) {
	forEachPath(t, func(t *testing.T, paths Options) {
		tpm, err := engine.New(newMem(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer tpm.Close()
		tpm.Init(0)
		tpm.Execute(nil, tpm2StartupClr)
		path := filepath.Join(t.TempDir(), "data")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ul, err := Unpolled(ln, path)
		if err != nil {
			t.Fatal(err)
		}
		srv := New(tpm, paths)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- srv.ServeData(ctx, ul, false) }()
		getRandomOn(t, path)
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		for range 3 { // kept: handed off
			c.Write(tpm2GetRandom8)
			readAnswers(t, c, 1)
		}
		c.Close()
		if err := ul.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("ServeData after Close: %v", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("ServeData still running 2 s after its Listener was closed")
		}
		srv.Wait()
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("socket file after Close: %v", err)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			t.Error("a closed Listener's socket still accepts")
		}
		if err := ul.Close(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("second Close: %v", err)
		}
		raw, _ := ul.SyscallConn()
		if err := raw.Control(func(uintptr) {}); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Control after Close: %v", err)
		}
	})
	t.Run("Accept", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "l")
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		ul, err := Unpolled(ln, "")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			if c, err := net.Dial("unix", path); err == nil {
				c.Write([]byte("hi"))
				c.Close()
			}
		}()
		c, err := ul.Accept()
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		if string(b) != "hi" {
			t.Errorf("accepted connection read %q", b)
		}
		ul.Close()
		if _, err := ul.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v", err)
		}
		if _, err := os.Stat(path); err != nil {
			t.Errorf("Close removed a file it was not given: %v", err)
		}
	})
}

// A connection the server did not accept (swtpm's clientfd=) goes to the
// stream loop after its first command too, and ends when the client does.
func TestHandleDataConnStreams(t *testing.T) {
	tpm := startedEngine(t)
	srv := New(tpm, Options{})
	p, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(p[0]), "server end")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); defer c.Close(); srv.HandleDataConn(context.Background(), c) }()
	client := os.NewFile(uintptr(p[1]), "client end")
	cc, err := net.FileConn(client)
	client.Close()
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		cc.Write(tpm2GetRandom8)
		readAnswers(t, cc, 1)
	}
	if got := srv.streamsServed.Load(); got != 1 {
		t.Errorf("%d connections in the stream loop, want 1", got)
	}
	cc.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("HandleDataConn still serving 5 s after the client closed")
	}
}
