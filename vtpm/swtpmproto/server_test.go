package swtpmproto

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/engine"

	"cvtpm/vtpm/engine/memstore"
	"cvtpm/vtpm/swtpmblob"
)

func newMem() *memstore.Store { return memstore.New() }

// cvtpmServer runs a Server on a real engine with unix control and data
// sockets in a temporary directory; it returns the control and data paths.
func cvtpmServer(t testing.TB) (srv *Server, ctrlPath, dataPath string) {
	t.Helper()
	return cvtpmServerWith(t, Options{})
}

// cvtpmServerWith is cvtpmServer with opts.
func cvtpmServerWith(t testing.TB, opts Options) (srv *Server, ctrlPath, dataPath string) {
	t.Helper()
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctrlPath, dataPath = filepath.Join(dir, "ctrl"), filepath.Join(dir, "data")
	srv = New(tpm, opts)
	ctx, cancel := context.WithCancel(context.Background())
	cl, err := net.Listen("unix", ctrlPath)
	if err != nil {
		t.Fatal(err)
	}
	dl, err := net.Listen("unix", dataPath)
	if err != nil {
		t.Fatal(err)
	}
	go srv.ServeControl(ctx, cl)
	go srv.ServeData(ctx, dl, false)
	t.Cleanup(func() {
		cancel()
		srv.CloseDataFD()
		srv.Wait()
		tpm.Close()
	})
	return srv, ctrlPath, dataPath
}

// swtpmServer runs the real swtpm 0.7 on unix sockets, or skips.
func swtpmServer(t *testing.T) (ctrlPath, dataPath string) {
	t.Helper()
	bin, err := exec.LookPath("swtpm")
	if err != nil {
		t.Skip("swtpm not installed")
	}
	if real, _ := filepath.EvalSymlinks(bin); filepath.Base(real) != "swtpm" {
		t.Skip("swtpm on PATH is not the real swtpm")
	}
	dir := t.TempDir()
	ctrlPath, dataPath = filepath.Join(dir, "ctrl"), filepath.Join(dir, "data")
	cmd := exec.Command(bin, "socket", "--tpm2", "--tpmstate", "dir="+dir,
		"--ctrl", "type=unixio,path="+ctrlPath)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Wait until swtpm listens: its socket file appears at bind(), a moment
	// before listen(), and a connect in between is refused.
	for range 500 {
		if c, err := net.Dial("unix", ctrlPath); err == nil {
			c.Close()
			return ctrlPath, dataPath
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("swtpm did not create its control socket")
	return
}

func rcOf(resp []byte) uint32 { return binary.BigEndian.Uint32(resp[6:10]) }

func ctrlMsg(cmd uint32, body ...byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, cmd), body...)
}

// roundTrip sends msg (with fd as SCM_RIGHTS if >= 0) and reads one reply.
func roundTrip(t *testing.T, c *net.UnixConn, msg []byte, fd int) []byte {
	t.Helper()
	var oob []byte
	if fd >= 0 {
		oob = syscall.UnixRights(fd)
	}
	if _, _, err := c.WriteMsgUnix(msg, oob, nil); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 8192)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("read reply to % x: %v", msg, err)
	}
	return buf[:n]
}

func dataRoundTrip(t *testing.T, c net.Conn, cmd []byte) []byte {
	t.Helper()
	if _, err := c.Write(cmd); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8192)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("data read: %v", err)
	}
	return buf[:n]
}

var (
	tpm2ReadClock  = []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x81}
	tpm2StartupClr = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0}
	tpm2GetRandom8 = []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8}
)

// qemuSequence replays QEMU's tpm-emulator start-up (DESIGN.md section 4)
// and returns every reply.
func qemuSequence(t *testing.T, ctrlPath string) [][]byte {
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrlPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	pair, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours := os.NewFile(uintptr(pair[0]), "qemu-end")
	data, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer data.Close()
	var out [][]byte
	out = append(out, roundTrip(t, c, ctrlMsg(CmdSetDataFD), pair[1]))
	syscall.Close(pair[1])
	out = append(out, dataRoundTrip(t, data, tpm2ReadClock))
	steps := [][]byte{
		ctrlMsg(CmdGetCapability),
		ctrlMsg(CmdStop),
		ctrlMsg(CmdSetBufferSize, 0, 0, 0, 0),
		ctrlMsg(CmdStop),
		ctrlMsg(CmdSetBufferSize, 0, 0, 0x10, 0),
		ctrlMsg(CmdInit, 0, 0, 0, 0),
		ctrlMsg(CmdGetTPMEstablished),
		ctrlMsg(CmdSetLocality, 0),
	}
	for _, m := range steps {
		out = append(out, roundTrip(t, c, m, -1))
	}
	out = append(out, dataRoundTrip(t, data, tpm2StartupClr))
	r := dataRoundTrip(t, data, tpm2GetRandom8)
	out = append(out, r[:10]) // header only: the random bytes differ
	return out
}

func TestQEMUStartupMatchesSwtpm(t *testing.T) {
	swCtrl, _ := swtpmServer(t)
	want := qemuSequence(t, swCtrl)
	_, ctrl, _ := cvtpmServer(t)
	got := qemuSequence(t, ctrl)
	if len(got) != len(want) {
		t.Fatalf("%d replies, swtpm gave %d", len(got), len(want))
	}
	for i := range want {
		g, w := got[i], want[i]
		if i == 2 { // GET_CAPABILITY: cvtpm adds PTM_CAP_LOCK_STORAGE (swtpm 0.8)
			g = bytes.Clone(g)
			g[5] &^= 0x01
		}
		if !bytes.Equal(g, w) {
			t.Errorf("reply %d: cvtpm % x, swtpm % x", i, got[i], w)
		}
	}
}

func TestControlCommands(t *testing.T) {
	_, ctrl, _ := cvtpmServer(t)
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrl, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	tests := []struct {
		name string
		msg  []byte
		want []byte
	}{
		{"established while stopped", ctrlMsg(CmdGetTPMEstablished), rc(rcBadOrdinal)},
		{"hash start while stopped", ctrlMsg(CmdHashStart), rc(rcBadOrdinal)},
		{"init with short body", ctrlMsg(CmdInit, 0, 0), rc(rcBadParameter)},
		{"unknown command", ctrlMsg(0x99), rc(rcBadOrdinal)},
		{"get config", ctrlMsg(CmdGetConfig), append(rc(0), 0, 0, 0, 0)},
		{"stop with a body", ctrlMsg(CmdStop, 1), rc(rcBadParameter)},
		{"locality 5", ctrlMsg(CmdSetLocality, 5), rc(rcBadLocality)},
		{"set state blob bad type", ctrlMsg(CmdSetStateBlob, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0), rc(rcBadParameter)},
		{"init", ctrlMsg(CmdInit, 0, 0, 0, 1), rc(0)},
		{"buffer size while running", ctrlMsg(CmdSetBufferSize, 0, 0, 0x10, 0), rc(rcBadOrdinal)},
		{"set state blob while running", ctrlMsg(CmdSetStateBlob, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0), rc(rcBadOrdinal)},
		{"hash start", ctrlMsg(CmdHashStart), rc(0)},
		{"hash data", ctrlMsg(CmdHashData, 0, 0, 0, 3, 'a', 'b', 'c'), rc(0)},
		{"hash end", ctrlMsg(CmdHashEnd), rc(0)},
		{"established after hash", ctrlMsg(CmdGetTPMEstablished), append(rc(0), 1, 0, 0, 0)},
		{"reset established at locality 3", ctrlMsg(CmdResetTPMEstablished, 3), rc(0)},
		{"established after reset", ctrlMsg(CmdGetTPMEstablished), append(rc(0), 0, 0, 0, 0)},
		{"store volatile", ctrlMsg(CmdStoreVolatile), rc(0)},
		{"lock storage without a store lock", ctrlMsg(CmdLockStorage, 0, 0, 0, 0), rc(rcFail)},
		{"get info bad offset", ctrlMsg(CmdGetInfo, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0), rc(rcBadParameter)},
		{"set data fd without fd", ctrlMsg(CmdSetDataFD), rc(rcBadParameter)},
	}
	for _, tc := range tests {
		if got := roundTrip(t, c, tc.msg, -1); !bytes.Equal(got, tc.want) {
			t.Errorf("%s: got % x, want % x", tc.name, got, tc.want)
		}
	}
	info := roundTrip(t, c, ctrlMsg(CmdGetInfo, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0), -1)
	wantJSON := `{"TPMSpecification":{"family":"2.0","level":0,"revision":164}}` + "\x00"
	if len(info) < 12 || string(info[12:]) != wantJSON || binary.BigEndian.Uint32(info[4:]) != uint32(len(wantJSON)) {
		t.Errorf("GET_INFO(1) = % x", info)
	}
}

func TestDataFraming(t *testing.T) {
	srv, ctrl, dataPath := cvtpmServer(t)
	_ = srv
	c, _ := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrl, Net: "unix"})
	defer c.Close()
	roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	d, err := net.Dial("unix", dataPath)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	prefixed := func(loc byte, cmd []byte) []byte {
		b := []byte{0, 0, 0, 8, loc}
		b = binary.BigEndian.AppendUint32(b, uint32(len(cmd)))
		return append(b, cmd...)
	}
	startupOK := []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0}
	initialized := []byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x00}
	tests := []struct {
		name string
		in   []byte
		want []byte
	}{
		{"prefixed startup", prefixed(0, tpm2StartupClr), append(append([]byte{0, 0, 0, 10}, startupOK...), 0, 0, 0, 0)},
		{"raw startup again", tpm2StartupClr, initialized},
		{"bad locality", prefixed(7, tpm2GetRandom8), append(append([]byte{0, 0, 0, 10}, 0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x07), 0, 0, 0, 0)},
	}
	for _, tc := range tests {
		if got := dataRoundTrip(t, d, tc.in); !bytes.Equal(got, tc.want) {
			t.Errorf("%s: got % x, want % x", tc.name, got, tc.want)
		}
	}
	// After an idle spell longer than the blocking-read window, the
	// connection waits in the netpoller and still answers.
	for range 3 {
		time.Sleep(3 * fastReadWindow * time.Microsecond)
		if got := dataRoundTrip(t, d, tpm2GetRandom8); len(got) != 20 || rcOf(got) != 0 {
			t.Fatalf("GetRandom after idling: % x", got)
		}
	}
	// Two commands in one write get two answers, in order.
	both := append(bytes.Clone(tpm2GetRandom8), tpm2GetRandom8...)
	if _, err := d.Write(both); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2*20)
	if _, err := io.ReadFull(d, buf); err != nil {
		t.Fatalf("pipelined replies: %v", err)
	}
	if binary.BigEndian.Uint32(buf[2:]) != 20 || binary.BigEndian.Uint32(buf[22:]) != 20 {
		t.Errorf("pipelined replies: % x", buf)
	}
}

func TestStateBlobOverTheWire(t *testing.T) {
	_, ctrl, _ := cvtpmServer(t)
	c, _ := net.DialUnix("unix", nil, &net.UnixAddr{Name: ctrl, Net: "unix"})
	defer c.Close()
	roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1)
	get := ctrlMsg(CmdGetStateBlob, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0)
	// The reply may exceed one read: read the header, then the rest.
	if _, err := c.Write(get); err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, 16)
	if _, err := io.ReadFull(c, hdr); err != nil {
		t.Fatal(err)
	}
	if rc := binary.BigEndian.Uint32(hdr); rc != 0 {
		t.Fatalf("GET_STATEBLOB: rc 0x%x", rc)
	}
	blob := make([]byte, binary.BigEndian.Uint32(hdr[12:]))
	if _, err := io.ReadFull(c, blob); err != nil {
		t.Fatal(err)
	}
	plain, err := swtpmblob.Decode(blob, nil)
	if err != nil || len(plain) == 0 {
		t.Fatalf("decoding the blob: %v", err)
	}
	roundTrip(t, c, ctrlMsg(CmdStop), -1)
	set := ctrlMsg(CmdSetStateBlob, 0, 0, 0, 0, 0, 0, 0, 1)
	set = binary.BigEndian.AppendUint32(set, uint32(len(blob)))
	set = append(set, blob...)
	if got := roundTrip(t, c, set, -1); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Errorf("SET_STATEBLOB: % x", got)
	}
	if got := roundTrip(t, c, ctrlMsg(CmdInit, 0, 0, 0, 0), -1); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
		t.Errorf("INIT after SET_STATEBLOB: % x", got)
	}
}

func TestMssim(t *testing.T) {
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	srv := New(tpm, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); srv.Wait() }()
	cmdLn, _ := net.Listen("tcp", "127.0.0.1:0")
	platLn, _ := net.Listen("tcp", "127.0.0.1:0")
	go srv.ServeMssimCommand(ctx, cmdLn)
	go srv.ServeMssimPlatform(ctx, platLn)
	plat, err := net.Dial("tcp", platLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer plat.Close()
	for _, code := range []uint32{MssimSignalPowerOn, MssimSignalNVOn, MssimSignalCancelOff} {
		if got := dataRoundTrip(t, plat, binary.BigEndian.AppendUint32(nil, code)); !bytes.Equal(got, []byte{0, 0, 0, 0}) {
			t.Errorf("platform code %d: reply % x", code, got)
		}
	}
	if !tpm.Running() {
		t.Fatal("POWER_ON did not start the TPM")
	}
	cc, err := net.Dial("tcp", cmdLn.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	send := append([]byte{0, 0, 0, 8, 0}, binary.BigEndian.AppendUint32(nil, uint32(len(tpm2StartupClr)))...)
	send = append(send, tpm2StartupClr...)
	want := []byte{0, 0, 0, 10, 0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0}
	if got := dataRoundTrip(t, cc, send); !bytes.Equal(got, want) {
		t.Errorf("TPM_SEND_COMMAND(Startup): % x, want % x", got, want)
	}
}

// TestTCPConnectionPerCommand follows tpm2-tss's swtpm TCTI (a connection
// per command) and checks --server ...,disconnect closing after one reply.
func TestTCPConnectionPerCommand(t *testing.T) {
	tpm, err := engine.New(newMem(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	srv := New(tpm, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); srv.Wait() }()
	if rc := tpm.Init(0); rc != 0 {
		t.Fatal(rc)
	}
	tpm.Execute(nil, tpm2StartupClr)
	for _, disconnect := range []bool{false, true} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go srv.ServeData(ctx, ln, disconnect)
		for i := range 3 {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			if got := dataRoundTrip(t, c, tpm2GetRandom8); len(got) != 20 || rcOf(got) != 0 {
				t.Errorf("disconnect=%v, connection %d: % x", disconnect, i, got)
			}
			if disconnect {
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if n, err := c.Read(make([]byte, 1)); err != io.EOF {
					t.Errorf("disconnect: server kept the connection (read %d, %v)", n, err)
				}
			}
			c.Close()
		}
	}
}

// A control header that declares a 16 MiB body reserves memory only as the
// body's bytes arrive: 50 connections that send such a header and trickle
// a byte cost far less than 50 x 16 MiB.
func TestControlHeaderDoesNotReserveItsBody(t *testing.T) {
	_, ctrlPath, _ := cvtpmServer(t)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	var conns []net.Conn
	for range 50 {
		c, err := net.Dial("unix", ctrlPath)
		if err != nil {
			t.Fatal(err)
		}
		hdr := binary.BigEndian.AppendUint32(nil, CmdSetStateBlob)
		hdr = binary.BigEndian.AppendUint32(hdr, 0)              // flags
		hdr = binary.BigEndian.AppendUint32(hdr, 1)              // type
		hdr = binary.BigEndian.AppendUint32(hdr, maxControlBody) // length
		c.Write(append(hdr, 0))
		conns = append(conns, c)
	}
	time.Sleep(100 * time.Millisecond)
	runtime.ReadMemStats(&after)
	for _, c := range conns {
		c.Close()
	}
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 64<<20 {
		t.Fatalf("50 headers declaring 16 MiB each allocated %d MiB", grew>>20)
	}
}
