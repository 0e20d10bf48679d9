package statestore

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"cvtpm/vtpm/swtpmblob"
)

func mustKey(t testing.TB, mode string, fill byte) *Key {
	t.Helper()
	k, err := NewKey(bytes.Repeat([]byte{fill}, 32), mode)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustOpen(t testing.TB, dir string, k *Key) *Store {
	t.Helper()
	s, err := Open(dir, Options{Key: k})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestRoundTrip(t *testing.T) {
	for _, mode := range []string{"none", "aes-256-gcm", "sm4-gcm"} {
		t.Run(mode, func(t *testing.T) {
			var k *Key
			if mode != "none" {
				k = mustKey(t, mode, 7)
			}
			dir := t.TempDir()
			s := mustOpen(t, dir, k)
			if _, err := s.Load("permall"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Load of absent blob: %v, want fs.ErrNotExist", err)
			}
			secret := []byte("a distinctive plaintext NV value 0123456789")
			for i := range 3 {
				if err := s.Save("permall", append(secret, byte(i))); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Save("volatilestate", []byte("vol")); err != nil {
				t.Fatal(err)
			}
			s.Close()

			s2 := mustOpen(t, dir, k)
			got, err := s2.Load("permall")
			if err != nil || !bytes.Equal(got, append(secret, 2)) {
				t.Fatalf("Load after reopen = %q, %v", got, err)
			}
			if s2.Generation() != 4 {
				t.Fatalf("generation %d, want 4", s2.Generation())
			}
			if err := s2.Delete("volatilestate"); err != nil {
				t.Fatal(err)
			}
			if _, err := s2.Load("volatilestate"); !errors.Is(err, fs.ErrNotExist) {
				t.Fatalf("Load after Delete: %v", err)
			}
			if err := s2.Delete("savestate"); err != nil {
				t.Fatalf("Delete of absent blob: %v", err)
			}
			// Sealed state must not contain the plaintext; unsealed must.
			found := false
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
				if bytes.Contains(b, secret) {
					found = true
				}
			}
			if found != (k == nil) {
				t.Fatalf("plaintext found in state files: %v, want %v", found, k == nil)
			}
		})
	}
}

// TestRefusals damages a sealed directory in each way an attacker or a
// crash could, and checks Open or Load refuses with the right error and
// that a refused Open writes nothing.
func TestRefusals(t *testing.T) {
	key := mustKey(t, "aes-256-gcm", 1)
	setup := func(t *testing.T, k *Key) (string, map[string][]byte) {
		dir := t.TempDir()
		s := mustOpen(t, dir, k)
		old := map[string][]byte{}
		for _, name := range []string{"permall", "volatilestate"} {
			if err := s.Save(name, []byte("first "+name)); err != nil {
				t.Fatal(err)
			}
			old[name], _ = os.ReadFile(s.path(name))
			if err := s.Save(name, []byte("second "+name)); err != nil {
				t.Fatal(err)
			}
		}
		s.Close()
		return dir, old
	}
	p := func(dir, name string) string { return filepath.Join(dir, "cvtpm."+name) }
	tests := []struct {
		name    string
		key     *Key // key used to reopen; setup uses `key` unless unsealed
		unseal  bool // set up without a key
		damage  func(t *testing.T, dir string, old map[string][]byte)
		wantErr error
		wantMsg string
	}{
		{"truncated blob", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			b, _ := os.ReadFile(p(dir, "permall"))
			os.WriteFile(p(dir, "permall"), b[:len(b)-5], 0o600)
		}, ErrTruncated, "cvtpm.permall: truncated: header says"},
		{"truncated to header", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			b, _ := os.ReadFile(p(dir, "permall"))
			os.WriteFile(p(dir, "permall"), b[:20], 0o600)
		}, ErrTruncated, "a header alone is 48"},
		{"flipped payload byte", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			flip(t, p(dir, "permall"), headerLen+2)
		}, ErrCorrupt, "authentication failed"},
		{"flipped tag byte", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			b, _ := os.ReadFile(p(dir, "permall"))
			flip(t, p(dir, "permall"), len(b)-1)
		}, ErrCorrupt, ""},
		{"flipped generation", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			flip(t, p(dir, "permall"), 23)
		}, ErrCorrupt, ""},
		{"flipped magic", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			flip(t, p(dir, "permall"), 0)
		}, ErrFormat, "bad magic"},
		{"flipped manifest", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			flip(t, p(dir, "manifest"), headerLen)
		}, ErrCorrupt, "cvtpm.manifest"},
		{"swapped files", key, false, swapBlobs, ErrSwapped, "holds another blob"},
		{"rolled back blob", key, false, func(t *testing.T, dir string, old map[string][]byte) {
			os.WriteFile(p(dir, "permall"), old["permall"], 0o600)
		}, ErrRolledBack, "generation 1 < expected 2"},
		{"deleted blob", key, false, func(t *testing.T, dir string, _ map[string][]byte) {
			os.Remove(p(dir, "permall"))
		}, ErrRolledBack, "missing"},
		{"wrong key", mustKey(t, "aes-256-gcm", 2), false, nil, ErrWrongKey, ""},
		{"wrong cipher", mustKey(t, "sm4-gcm", 1), false, nil, ErrWrongKey, "file uses aes-256-gcm"},
		{"no key for sealed state", nil, false, nil, ErrNeedKey, ""},
		{"key for unsealed state", key, true, nil, ErrNotSealed, ""},
		{"unsealed flipped byte", nil, true, func(t *testing.T, dir string, _ map[string][]byte) {
			flip(t, p(dir, "permall"), headerLen+1)
		}, ErrCorrupt, "checksum mismatch"},
		{"unsealed swapped", nil, true, swapBlobs, ErrSwapped, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			setupKey := key
			if tc.unseal {
				setupKey = nil
			}
			dir, old := setup(t, setupKey)
			if tc.damage != nil {
				tc.damage(t, dir, old)
			}
			before := snapshot(t, dir)
			s, err := Open(dir, Options{Key: tc.key})
			if err == nil {
				s.Close()
				t.Fatalf("Open accepted a damaged directory")
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("error %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) {
				t.Fatalf("error %q does not say %q", err, tc.wantMsg)
			}
			if after := snapshot(t, dir); after != before {
				t.Fatalf("a refused Open changed the directory:\n%s\n%s", before, after)
			}
		})
	}
}

// A crash between the blob rename and the manifest update leaves a blob
// newer than the manifest: that is accepted, not reported as rollback.
func TestCrashBetweenBlobAndManifest(t *testing.T) {
	key := mustKey(t, "sm4-gcm", 3)
	dir := t.TempDir()
	s := mustOpen(t, dir, key)
	s.Save("permall", []byte("one"))
	manifest, _ := os.ReadFile(s.path(manifestName))
	s.Save("permall", []byte("two"))
	s.Close()
	os.WriteFile(filepath.Join(dir, "cvtpm.manifest"), manifest, 0o600)
	s2 := mustOpen(t, dir, key)
	got, err := s2.Load("permall")
	if err != nil || string(got) != "two" {
		t.Fatalf("Load = %q, %v; want two", got, err)
	}
	if err := s2.Save("permall", []byte("three")); err != nil {
		t.Fatal(err)
	}
	if s2.Generation() != 3 {
		t.Fatalf("generation %d, want 3", s2.Generation())
	}
}

// With a key, sealed blobs whose manifest is gone, or a directory whose
// state is gone altogether (MustExist), are refused: the host must not be
// able to roll a blob back by deleting the manifest, nor get a new TPM by
// deleting everything.
func TestMissingManifest(t *testing.T) {
	key := mustKey(t, "", 4)
	dir := t.TempDir()
	s := mustOpen(t, dir, key)
	s.Save("permall", []byte("one"))
	s.Close()
	os.Remove(filepath.Join(dir, "cvtpm.manifest"))
	if _, err := Open(dir, Options{Key: key}); !errors.Is(err, ErrNoManifest) || !strings.Contains(err.Error(), "cvtpm.permall") {
		t.Fatalf("Open without manifest: %v", err)
	}
	empty := t.TempDir()
	if _, err := Open(empty, Options{Key: key, MustExist: true}); !errors.Is(err, ErrNoManifest) {
		t.Fatalf("Open of an emptied directory with MustExist: %v", err)
	}
	// A new sealed store writes its manifest at once, so a crash before
	// the first manifest update cannot look like tampering.
	s2 := mustOpen(t, empty, key)
	s2.Close()
	if _, err := os.Stat(filepath.Join(empty, "cvtpm.manifest")); err != nil {
		t.Fatalf("new sealed store has no manifest: %v", err)
	}
	if _, err := Open(empty, Options{Key: key, MustExist: true}); err != nil {
		t.Fatalf("reopening a new store with MustExist: %v", err)
	}
}

// A backend creating an instance defers the new store's manifest to the
// first blob: until then the directory is not a store, and a later Open of
// it as an existing instance is refused like an emptied one.
func TestDeferManifest(t *testing.T) {
	key := mustKey(t, "", 6)
	unfinished := t.TempDir()
	s, err := Open(unfinished, Options{Key: key, DeferManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if _, err := os.Stat(filepath.Join(unfinished, "cvtpm.manifest")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("deferred manifest written at Open: %v", err)
	}
	if _, err := Open(unfinished, Options{Key: key, MustExist: true}); !errors.Is(err, ErrNoManifest) {
		t.Fatalf("an unfinished creation reopened as an instance: %v", err)
	}

	dir := t.TempDir()
	s, err = Open(dir, Options{Key: key, DeferManifest: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save("permall", []byte("one")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(dir, Options{Key: key, MustExist: true})
	if err != nil {
		t.Fatalf("reopening after the first blob: %v", err)
	}
	defer s.Close()
	if b, err := s.Load("permall"); err != nil || string(b) != "one" {
		t.Fatalf("permall after reopening: %q, %v", b, err)
	}
}

func TestRaiseGeneration(t *testing.T) {
	key := mustKey(t, "", 5)
	dir := t.TempDir()
	s := mustOpen(t, dir, key)
	s.Save("permall", []byte("one"))
	if err := s.RaiseGeneration(100); err != nil {
		t.Fatal(err)
	}
	s.RaiseGeneration(50) // never lowers
	s.Close()
	s2 := mustOpen(t, dir, key)
	defer s2.Close()
	if g := s2.Generation(); g != 100 {
		t.Fatalf("generation after reopen %d, want 100", g)
	}
}

func TestTransferEnvelope(t *testing.T) {
	key := mustKey(t, "sm4-gcm", 6)
	env, err := key.SealTransfer("vm1", "permall", 42, []byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	plain, gen, err := key.OpenTransfer("vm1", "permall", env)
	if err != nil || string(plain) != "state" || gen != 42 {
		t.Fatalf("OpenTransfer = %q, %d, %v", plain, gen, err)
	}
	stateFile, _ := seal(key, 1, 1, []byte("state"))
	flipped := bytes.Clone(env)
	flipped[len(flipped)-1] ^= 1
	for _, tc := range []struct {
		name, instance, blob string
		b                    []byte
		want                 error
	}{
		{"another instance", "vm2", "permall", env, ErrWrongKey},
		{"another migration key", "vm1", "permall", mustTransfer(t, mustKey(t, "sm4-gcm", 7)), ErrWrongKey},
		{"another blob type", "vm1", "volatilestate", env, ErrSwapped},
		{"tampered", "vm1", "permall", flipped, ErrCorrupt},
		{"plaintext swtpm blob", "vm1", "permall", []byte("\x02\x01\x00\x0aplain libtpms state"), ErrNotTransfer},
		{"a state file", "vm1", "permall", stateFile, ErrNotTransfer},
		{"truncated", "vm1", "permall", env[:30], ErrTruncated},
	} {
		if _, _, err := key.OpenTransfer(tc.instance, tc.blob, tc.b); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
}

// mustTransfer seals the same blob as env under k (another migration key).
func mustTransfer(t *testing.T, k *Key) []byte {
	env, err := k.SealTransfer("vm1", "permall", 42, []byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	return env
}

func TestLock(t *testing.T) {
	dir := t.TempDir()
	s := mustOpen(t, dir, nil)
	if err := s.Lock(); err != nil {
		t.Fatal(err)
	}
	// flock locks are per open file description: a second Store in this
	// process stands in for another process.
	s2 := mustOpen(t, dir, nil)
	if err := s2.Lock(); err == nil || !strings.Contains(err.Error(), fmt.Sprintf("is in use by PID %d", os.Getpid())) {
		t.Fatalf("second Lock: %v", err)
	}
	s.Unlock()
	if err := s2.Lock(); err != nil {
		t.Fatalf("Lock after Unlock: %v", err)
	}
}

func TestImportSwtpm(t *testing.T) {
	dir := t.TempDir()
	swtpmFile, err := swtpmblob.Encode([]byte("perm"), nil)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "tpm2-00.permall"), swtpmFile, 0o600)
	// Without ImportSwtpm, plaintext state in a sealed directory is refused.
	if _, err := Open(dir, Options{Key: mustKey(t, "", 9)}); err == nil || !strings.Contains(err.Error(), "refusing to import it implicitly") {
		t.Fatalf("implicit import with a key: %v", err)
	}
	s, err := Open(dir, Options{Key: mustKey(t, "", 9), ImportSwtpm: true})
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Load("permall")
	if err != nil || string(got) != "perm" {
		t.Fatalf("imported permall = %q, %v", got, err)
	}
	s.Save("permall", []byte("changed"))
	s.Close()
	// Once cvtpm state exists, the swtpm original is not imported again.
	s2, err := Open(dir, Options{Key: mustKey(t, "", 9)})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got, _ := s2.Load("permall"); string(got) != "changed" {
		t.Fatalf("permall after reopen = %q", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "tpm2-00.permall")); err != nil {
		t.Fatalf("original swtpm file was not kept: %v", err)
	}

	bad := t.TempDir()
	os.WriteFile(filepath.Join(bad, "tpm2-00.permall"), []byte("garbage"), 0o600)
	if _, err := Open(bad, Options{ImportSwtpm: true}); err == nil || !strings.Contains(err.Error(), "tpm2-00.permall") {
		t.Fatalf("bad swtpm file: %v", err)
	}
}

func TestKeySources(t *testing.T) {
	dir := t.TempDir()
	hexKey := strings.Repeat("ab", 32)
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(s), 0o600)
		return p
	}
	tests := []struct {
		name    string
		get     func() (*Key, error)
		wantErr string
		cipher  string
	}{
		{"hex file", func() (*Key, error) { return KeyFromFile(write("k1", hexKey+"\n"), "hex", "", false) }, "", "aes-256-gcm"},
		{"binary file sm4", func() (*Key, error) {
			return KeyFromFile(write("k2", strings.Repeat("x", 16)), "binary", "sm4-gcm", false)
		}, "", "sm4-gcm"},
		{"swtpm cbc mapped", func() (*Key, error) { return KeyFromFile(write("k3", hexKey), "hex", "aes-256-cbc", false) }, "", "aes-256-gcm"},
		{"bad hex", func() (*Key, error) { return KeyFromFile(write("k4", "zz"+hexKey[2:]), "hex", "", false) }, "not hex", ""},
		{"short key", func() (*Key, error) { return KeyFromFile(write("k5", "abcd"), "hex", "", false) }, "2 bytes", ""},
		{"bad mode", func() (*Key, error) { return KeyFromFile(write("k6", hexKey), "hex", "rot13", false) }, "rot13", ""},
		{"missing file", func() (*Key, error) { return KeyFromFile(filepath.Join(dir, "nope"), "hex", "", false) }, "reading key file", ""},
		{"password pbkdf2", func() (*Key, error) { return KeyFromPassword([]byte("hunter2\n"), "pbkdf2", "") }, "", "aes-256-gcm"},
		{"password sha512", func() (*Key, error) { return KeyFromPassword([]byte("hunter2"), "sha512", "sm4-gcm") }, "", "sm4-gcm"},
		{"empty password", func() (*Key, error) { return KeyFromPassword([]byte("\n"), "", "") }, "empty", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k, err := tc.get()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				if err != nil && strings.Contains(err.Error(), hexKey[4:20]) {
					t.Fatalf("error leaks key material: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if k.Cipher() != tc.cipher {
				t.Fatalf("cipher %s, want %s", k.Cipher(), tc.cipher)
			}
			for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k)} {
				if strings.Contains(s, "abab") || !strings.Contains(s, "redacted") {
					t.Fatalf("key prints as %q", s)
				}
			}
		})
	}
	p := write("gone", hexKey)
	if _, err := KeyFromFile(p, "hex", "", true); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("remove=true kept the key file")
	}
	a, _ := KeyFromPassword([]byte("pw"), "", "")
	b, _ := KeyFromPassword([]byte("pw"), "", "")
	if a.id != b.id {
		t.Fatalf("the same password derived different keys")
	}
}

// swapBlobs exchanges the permall and volatilestate files.
func swapBlobs(t *testing.T, dir string, _ map[string][]byte) {
	a := filepath.Join(dir, "cvtpm.permall")
	b := filepath.Join(dir, "cvtpm.volatilestate")
	if err := os.Rename(a, a+".x"); err != nil {
		t.Fatal(err)
	}
	os.Rename(b, a)
	os.Rename(a+".x", b)
}

func flip(t *testing.T, path string, off int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[off] ^= 0x40
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// snapshot describes every file in dir with its contents' hash.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var sb strings.Builder
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		fmt.Fprintf(&sb, "%s:%x ", e.Name(), b)
	}
	return sb.String()
}

func BenchmarkSave(b *testing.B) {
	s := mustOpen(b, b.TempDir(), mustKey(b, "aes-256-gcm", 5))
	blob := bytes.Repeat([]byte{1}, 8192)
	for b.Loop() {
		if err := s.Save("permall", blob); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLoad(b *testing.B) {
	for _, mode := range []string{"aes-256-gcm", "sm4-gcm"} {
		b.Run(mode, func(b *testing.B) {
			s := mustOpen(b, b.TempDir(), mustKey(b, mode, 5))
			s.Save("permall", bytes.Repeat([]byte{1}, 8192))
			for b.Loop() {
				if _, err := s.Load("permall"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// An instance's worker seals its state at every write to the TPM's NV, and
// an idle worker holds every heap page it ever touched until a collection
// (which a small heap rarely reaches): a Save must not make garbage in
// proportion to the blob, nor build its cipher again. The ciphertext goes
// through one buffer the store keeps.
func TestSaveMakesLittleGarbage(t *testing.T) {
	for _, mode := range []string{"aes-256-gcm", "sm4-gcm"} {
		t.Run(mode, func(t *testing.T) {
			s := mustOpen(t, t.TempDir(), mustKey(t, mode, 7))
			blob := bytes.Repeat([]byte{0x5a}, 16<<10)
			// Room for the growth below: the test itself allocates nothing.
			blob = slices.Grow(blob, 4096)
			if err := s.Save("permall", blob); err != nil { // sizes the buffer
				t.Fatal(err)
			}
			const saves = 20
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range saves {
				// The state grows a little with each NV index or object.
				blob = append(blob, bytes.Repeat([]byte{0xa5}, 16)...)
				if err := s.Save("permall", blob); err != nil {
					t.Fatal(err)
				}
			}
			runtime.ReadMemStats(&after)
			perSave := (after.TotalAlloc - before.TotalAlloc) / saves
			t.Logf("%d bytes allocated per Save of a 16 KiB blob", perSave)
			if perSave > 1536 {
				t.Errorf("one Save of a 16 KiB blob allocates %d bytes, want at most 1.5 KiB", perSave)
			}
			got, err := s.Load("permall")
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("Load after the saves: %v", err)
			}
		})
	}
}

// Files the host planted in the state directory (on the disk it gives the
// CVM) at temporary names are neither written through nor in the way: a
// store's temporary names carry a random suffix drawn at Open, and are
// created exclusively, never through a symbolic link.
func TestPlantedTemporaryFile(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(outside, []byte("untouched"), 0o600); err != nil {
		t.Fatal(err)
	}
	planted := []string{filepath.Join(dir, ".cvtpm.manifest.tmp"), filepath.Join(dir, ".cvtpm.permall.tmp")}
	if err := os.Symlink(outside, planted[1]); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(planted[0], []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := mustOpen(t, dir, mustKey(t, "aes-256-gcm", 7))
	if err := s.Save("permall", []byte("state")); err != nil {
		t.Fatalf("Save with planted temporary files: %v", err)
	}
	if b, _ := os.ReadFile(outside); string(b) != "untouched" {
		t.Errorf("the symlink's target was written: %q", b)
	}
	if got, err := s.Load("permall"); err != nil || string(got) != "state" {
		t.Errorf("Load: %q, %v", got, err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*.tmp"))
	if !slices.Equal(left, planted) {
		t.Errorf("temporary files after the save: %v, want only the planted %v", left, planted)
	}
}

// A FIFO planted at a state file's name is refused at Open with an error
// naming it, not read (which would block for ever).
func TestPlantedFIFO(t *testing.T) {
	for _, name := range []string{"cvtpm.manifest", "cvtpm.permall"} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			k := mustKey(t, "aes-256-gcm", 7)
			s := mustOpen(t, dir, k)
			if err := s.Save("permall", []byte("state")); err != nil {
				t.Fatal(err)
			}
			s.Close()
			p := filepath.Join(dir, name)
			os.Remove(p)
			if err := syscall.Mkfifo(p, 0o600); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() {
				s, err := Open(dir, Options{Key: k})
				if err == nil {
					s.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), "not a regular file") || !strings.Contains(err.Error(), name) {
					t.Errorf("Open with a FIFO at %s: %v, want a refusal naming it", name, err)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("Open with a FIFO at %s hangs", name)
			}
		})
	}
}
