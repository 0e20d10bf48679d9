package directlink

import (
	"bytes"
	"errors"
	"testing"

	"cvtpm/internal/gcm"
)

func testKeys(t testing.TB, cipherName string) Keys {
	t.Helper()
	export := func(label string, ctx []byte, n int) ([]byte, error) {
		if label != ExporterLabel || string(ctx) != "vm1" {
			t.Fatalf("exporter asked for %q/%q", label, ctx)
		}
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i)
		}
		return b, nil
	}
	k, err := ExportKeys(export, "vm1", cipherName)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func pair(t testing.TB, k Keys) (*Sealer, *Opener) {
	t.Helper()
	s, err := NewSealer(k.Cipher, k.ClientToServer)
	if err != nil {
		t.Fatal(err)
	}
	o, err := NewOpener(k.Cipher, k.ClientToServer)
	if err != nil {
		t.Fatal(err)
	}
	return s, o
}

func TestRecordsRoundTrip(t *testing.T) {
	for _, c := range []string{gcm.AES256, gcm.SM4} {
		t.Run(c, func(t *testing.T) {
			k := testKeys(t, c)
			if len(k.ClientToServer) != gcm.KeySize(c) || bytes.Equal(k.ClientToServer, k.ServerToClient) {
				t.Fatalf("keys %x / %x", k.ClientToServer, k.ServerToClient)
			}
			s, o := pair(t, k)
			var stream []byte
			msgs := [][]byte{[]byte("first"), bytes.Repeat([]byte{7}, 4096), {}}
			for _, m := range msgs {
				var err error
				if stream, err = s.Seal(stream, m); err != nil {
					t.Fatal(err)
				}
			}
			if bytes.Contains(stream, []byte("first")) {
				t.Fatal("plaintext in the stream")
			}
			// Read back through ReadRecord and through Split.
			r := bytes.NewReader(stream)
			for i, m := range msgs {
				rec, err := ReadRecord(r, nil)
				if err != nil {
					t.Fatal(err)
				}
				got, err := o.Open(rec)
				if len(m) == 0 {
					// The empty message is the worker's end of the session.
					if !errors.Is(err, ErrEnded) {
						t.Fatalf("message %d (empty): %q, %v; want ErrEnded", i, got, err)
					}
					continue
				}
				if err != nil || !bytes.Equal(got, m) {
					t.Fatalf("message %d: %q, %v", i, got, err)
				}
			}
		})
	}
}

func TestRecordsRefused(t *testing.T) {
	k := testKeys(t, gcm.AES256)
	seal := func(n int) [][]byte {
		s, _ := pair(t, k)
		var out [][]byte
		for i := range n {
			b, err := s.Seal(nil, []byte{byte(i), 1, 2, 3})
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, b)
		}
		return out
	}
	flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 1; return b }
	wrongDir, _ := NewSealer(k.Cipher, k.ServerToClient)
	other, _ := wrongDir.Seal(nil, []byte{0, 1, 2, 3})
	for _, tc := range []struct {
		name    string
		records func() [][]byte
	}{
		{"altered ciphertext", func() [][]byte { r := seal(1); return [][]byte{flip(r[0], 6)} }},
		{"altered tag", func() [][]byte { r := seal(1); return [][]byte{flip(r[0], len(r[0])-1)} }},
		{"replayed", func() [][]byte { r := seal(1); return [][]byte{r[0], r[0]} }},
		{"reordered", func() [][]byte { r := seal(2); return [][]byte{r[1], r[0]} }},
		{"dropped", func() [][]byte { r := seal(3); return [][]byte{r[0], r[2]} }},
		{"other direction", func() [][]byte { return [][]byte{other} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, o := pair(t, k)
			var err error
			for _, rec := range tc.records() {
				if _, err = o.Open(bytes.Clone(rec)); err != nil {
					break
				}
			}
			if !errors.Is(err, ErrRecord) {
				t.Fatalf("got %v, want ErrRecord", err)
			}
		})
	}
}

func TestSplit(t *testing.T) {
	k := testKeys(t, gcm.AES256)
	s, _ := pair(t, k)
	rec, _ := s.Seal(nil, []byte("hello"))
	for n := range len(rec) {
		if _, _, ok, err := Split(rec[:n]); ok || err != nil {
			t.Fatalf("%d bytes: ok %v err %v", n, ok, err)
		}
	}
	got, rest, ok, err := Split(append(bytes.Clone(rec), 9))
	if !ok || err != nil || !bytes.Equal(got, rec) || !bytes.Equal(rest, []byte{9}) {
		t.Fatalf("split %x %x %v %v", got, rest, ok, err)
	}
	for _, bad := range [][]byte{{0, 0, 0, 0}, {0, 0, 0, 15}, {0, 1, 0, 1}, {0xff, 0xff, 0xff, 0xff}} {
		if _, _, _, err := Split(bad); !errors.Is(err, ErrRecord) {
			t.Errorf("length %x: %v", bad, err)
		}
	}
	if _, err := s.Seal(nil, make([]byte, MaxRecord)); !errors.Is(err, ErrRecord) {
		t.Errorf("oversized message sealed: %v", err)
	}
	if _, err := ExportKeys(nil, "vm1", "aes-128-cbc"); err == nil {
		t.Error("unknown cipher accepted")
	}
}

// FuzzOpen feeds outside bytes (what the host relays to a worker) to Split
// and Open: they must refuse, never panic, and never open a record that
// was not sealed with the key.
func FuzzOpen(f *testing.F) {
	k := testKeys(f, gcm.AES256)
	s, _ := pair(f, k)
	good, _ := s.Seal(nil, []byte("command"))
	f.Add(good)
	f.Add([]byte{0, 0, 0, 16})
	f.Add(append(bytes.Clone(good), good...))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, o := pair(t, k)
		buf := bytes.Clone(b)
		for {
			rec, rest, ok, err := Split(buf)
			if err != nil || !ok {
				return
			}
			msg, err := o.Open(rec)
			if err == nil && !bytes.Equal(b[:len(good)], good) {
				t.Fatalf("opened a record not sealed with the key: %q", msg)
			}
			if err != nil {
				return
			}
			buf = rest
		}
	})
}
