package test

// A man in the middle between the host's relay and the backend, with the
// real processes: every manipulation ends the session, no corrupted
// response reaches the guest, and the instance's state changes only as the
// guest asked.

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

// recordMITM forwards TCP at TLS-record granularity and, when armed,
// rewrites the next application-data record from the guest side.
type recordMITM struct {
	mu     sync.Mutex
	tamper func(rec []byte) [][]byte
	seen   int // application records tampered with
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
			go m.pipe(c, s, true)
			go m.pipe(s, c, false)
		}
	}()
	return "tcp:" + ln.Addr().String(), m
}

func (m *recordMITM) arm(f func(rec []byte) [][]byte) {
	m.mu.Lock()
	m.tamper = f
	m.mu.Unlock()
}

func (m *recordMITM) pipe(src, dst net.Conn, toBackend bool) {
	defer src.Close()
	defer dst.Close()
	for {
		hdr := make([]byte, 5)
		if _, err := io.ReadFull(src, hdr); err != nil {
			return
		}
		rec := make([]byte, 5+int(binary.BigEndian.Uint16(hdr[3:])))
		copy(rec, hdr)
		if _, err := io.ReadFull(src, rec[5:]); err != nil {
			return
		}
		out := [][]byte{rec}
		m.mu.Lock()
		if toBackend && m.tamper != nil && rec[0] == 23 {
			out = m.tamper(rec)
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

func TestManInTheMiddleBetweenRelayAndBackend(t *testing.T) {
	f := testenv.NewTopologyFiles(t, 0x7)
	topo := testenv.StartBackend(t, f)
	topo.Admin(t, "create", "vm1")
	mitmAddr, m := startRecordMITM(t, strings.TrimPrefix(topo.LinkAddr, "tcp:"))
	relay := "tcp:127.0.0.1:" + itoa(testenv.FreePort(t))
	testenv.StartDaemon(t, "frontend relay", []string{relay}, "frontend", "--backend", mitmAddr, "--relay", relay)
	_, tcti := topo.StartGuestProxy(t, relay, "guest-vm1", "vm1", f.Policy)
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
		tamper func(rec []byte) [][]byte
		ran    bool // the genuine command legitimately ran once
	}{
		{"flip a byte", func(r []byte) [][]byte { r[len(r)-5] ^= 0x01; return [][]byte{r} }, false},
		{"truncate and drop the connection", func(r []byte) [][]byte { return nil }, false},
		{"replay the command", func(r []byte) [][]byte { return [][]byte{r, r} }, true},
		{"altered length field", func(r []byte) [][]byte {
			binary.BigEndian.PutUint16(r[3:], uint16(len(r)-6))
			return [][]byte{r[:len(r)-1]}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := read(t)
			m.arm(tc.tamper)
			err := increment()
			if !tc.ran && err == nil {
				t.Fatal("a manipulated command succeeded")
			}
			time.Sleep(100 * time.Millisecond)
			// The session has ended: if the tampered call itself got its
			// answer (a replay trails the genuine record), the next fails.
			_, probe := (tpm2.GetRandom{BytesRequested: 4}).Execute(tpm)
			if err == nil && probe == nil {
				t.Fatal("the session survived the manipulation")
			}
			// The next call opens a new attested session.
			after := read(t)
			want := before
			if tc.ran {
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
