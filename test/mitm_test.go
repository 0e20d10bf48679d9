package test

// A man in the middle between the host's relay and the backend, with the
// real processes: every manipulation ends the session, no corrupted
// response reaches the guest, and the instance's state changes only as the
// guest asked, through the supervisor and through a direct session.

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"cvtpm/internal/tpmsock"
	"cvtpm/test/testenv"
)

// recordMITM forwards TCP record by record and, when armed, rewrites the
// next application record from the guest side. It reads TLS records and,
// after a direct session's hand-off, direct-session records (a u32 length
// of at most 16 KiB: their first byte is 0, which no TLS content type is).
type recordMITM struct {
	mu     sync.Mutex
	tamper func(rec []byte, header int) [][]byte
	seen   int // application records tampered with
	conns  int // connections relayed
}

func startRecordMITM(t *testing.T, backend string) (addr string, m *recordMITM) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	m = &recordMITM{}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", backend)
			if err != nil {
				c.Close()
				continue
			}
			m.mu.Lock()
			m.conns++
			m.mu.Unlock()
			go m.pipe(c, s, true)
			go m.pipe(s, c, false)
		}
	}()
	return "tcp:" + ln.Addr().String(), m
}

func (m *recordMITM) arm(f func(rec []byte, header int) [][]byte) {
	m.mu.Lock()
	m.tamper = f
	m.mu.Unlock()
}

func (m *recordMITM) connections() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.conns
}

func (m *recordMITM) pipe(src, dst net.Conn, toBackend bool) {
	defer src.Close()
	defer dst.Close()
	for {
		first := make([]byte, 1)
		if _, err := io.ReadFull(src, first); err != nil {
			return
		}
		var rec []byte
		app := false
		if first[0] == 0 { // a direct-session record: u32 length
			hdr := make([]byte, 4)
			hdr[0] = 0
			if _, err := io.ReadFull(src, hdr[1:]); err != nil {
				return
			}
			rec = append(hdr, make([]byte, binary.BigEndian.Uint32(hdr))...)
			if _, err := io.ReadFull(src, rec[4:]); err != nil {
				return
			}
			app = true
		} else { // TLS: type, version, u16 length
			hdr := make([]byte, 5)
			hdr[0] = first[0]
			if _, err := io.ReadFull(src, hdr[1:]); err != nil {
				return
			}
			rec = make([]byte, 5+int(binary.BigEndian.Uint16(hdr[3:])))
			copy(rec, hdr)
			if _, err := io.ReadFull(src, rec[5:]); err != nil {
				return
			}
			app = rec[0] == 23
		}
		out := [][]byte{rec}
		m.mu.Lock()
		if toBackend && m.tamper != nil && app {
			header := 5
			if first[0] == 0 {
				header = 4
			}
			out = m.tamper(rec, header)
			m.tamper = nil
			m.seen++
		}
		m.mu.Unlock()
		if out == nil {
			return // drop the record and the connection
		}
		for _, r := range out {
			if _, err := dst.Write(r); err != nil {
				return
			}
		}
	}
}

// Through the supervisor every manipulation ends the session and the
// command is not run (a replay: run once). Through a direct session the
// worker that refuses a record says so, sealed, before it ends the
// session, and the guest proxy sends the command again on a new one: it
// runs exactly once; a dropped connection leaves it not run.
func TestManInTheMiddleBetweenRelayAndBackend(t *testing.T) {
	for _, c := range []struct {
		name   string
		direct bool
	}{{"via the supervisor", false}, {"direct session", true}} {
		t.Run(c.name, func(t *testing.T) { manInTheMiddle(t, c.direct) })
	}
}

func manInTheMiddle(t *testing.T, direct bool) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	mitmAddr, m := startRecordMITM(t, strings.TrimPrefix(topo.LinkAddr, "tcp:"))
	relay := "tcp:127.0.0.1:" + itoa(testenv.FreePort(t))
	testenv.StartDaemon(t, "frontend relay", []string{relay}, "frontend", "--backend", mitmAddr, "--relay", relay)
	mode := "off"
	if direct {
		mode = "aes-256-gcm"
	}
	_, tcti := topo.StartGuestProxy(t, relay, "guest-vm1", "vm1", f.Policy, "--direct", mode)
	port := tcti[strings.LastIndex(tcti, "=")+1:]
	tpm, err := tpmsock.Dial(context.Background(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	// An NV counter: every increment that reaches the TPM shows.
	const idx = tpm2.TPMHandle(0x01500030)
	pub := tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256, DataSize: 8,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, NoDA: true, NT: tpm2.TPMNTCounter}}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: tpm2.TPMRHOwner, PublicInfo: tpm2.New2B(pub)}).Execute(tpm); err != nil {
		t.Fatal(err)
	}
	rp, err := (tpm2.NVReadPublic{NVIndex: idx}).Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
	nv := tpm2.NamedHandle{Handle: idx, Name: rp.NVName}
	increment := func() error {
		_, err := (tpm2.NVIncrement{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv}).Execute(tpm)
		return err
	}
	read := func(t *testing.T) uint64 {
		t.Helper()
		r, err := (tpm2.NVRead{AuthHandle: tpm2.TPMRHOwner, NVIndex: nv, Size: 8}).Execute(tpm)
		if err != nil {
			t.Fatalf("reading the counter after the manipulation: %v", err)
		}
		return binary.BigEndian.Uint64(r.Data.Buffer)
	}
	if err := increment(); err != nil {
		t.Fatal(err)
	}
	if v := read(t); v == 0 {
		t.Fatal("counter did not count")
	}
	for _, tc := range []struct {
		name   string
		tamper func(rec []byte, header int) [][]byte
		// ran: the genuine command ran once (a replay trails it; through a
		// direct session a refused record is sent again on a new session).
		ran, ranDirect bool
	}{
		{"flip a byte", func(r []byte, _ int) [][]byte { r[len(r)-5] ^= 0x01; return [][]byte{r} }, false, true},
		{"truncate and drop the connection", func(r []byte, _ int) [][]byte { return nil }, false, false},
		{"replay the command", func(r []byte, _ int) [][]byte { return [][]byte{r, r} }, true, true},
		{"altered length field", func(r []byte, header int) [][]byte {
			if header == 4 {
				binary.BigEndian.PutUint32(r, uint32(len(r)-5))
			} else {
				binary.BigEndian.PutUint16(r[3:], uint16(len(r)-6))
			}
			return [][]byte{r[:len(r)-1]}
		}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ran := tc.ran
			if direct {
				ran = tc.ranDirect
			}
			before := read(t)
			conns := m.connections()
			m.arm(tc.tamper)
			err := increment()
			if !ran && err == nil {
				t.Fatal("a manipulated command succeeded")
			}
			time.Sleep(100 * time.Millisecond)
			// The session has ended: if the tampered call itself got its
			// answer (a replay trails the genuine record), the next fails,
			// or (a direct session) goes on a new session.
			_, probe := (tpm2.GetRandom{BytesRequested: 4}).Execute(tpm)
			if err == nil && probe == nil && m.connections() == conns {
				t.Fatal("the session survived the manipulation")
			}
			// The next call opens a new attested session.
			after := read(t)
			want := before
			if ran {
				want++
			}
			if after != want {
				t.Fatalf("counter %d -> %d, want %d: the manipulation changed the instance", before, after, want)
			}
		})
	}
	if m.seen != 4 {
		t.Fatalf("tampered with %d records, want 4", m.seen)
	}
}
