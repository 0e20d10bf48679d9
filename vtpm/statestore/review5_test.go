package statestore

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// Open keeps a descriptor on the directory from its first step; an Open
// that then fails to take the directory's lock (another holder: a second
// worker, CMD_LOCK_STORAGE's retries in `cvtpm socket`) must give it back,
// as the load and checkOrigin failures do.
func TestReview5OpenLockFailureLeaksDirFD(t *testing.T) {
	dir := t.TempDir()
	holder, err := Open(dir, Options{Key: mustKey(t, "aes-256-gcm", 7), Lock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	before := openFDs(t)
	const tries = 50
	for range tries {
		if s, err := Open(dir, Options{Key: mustKey(t, "aes-256-gcm", 7), Lock: true}); err == nil {
			s.Close()
			t.Fatal("a second Open with Lock succeeded while the lock is held")
		}
	}
	if leaked := openFDs(t) - before; leaked > 0 {
		t.Errorf("%d failed Opens (lock held elsewhere) left %d descriptors open: the directory descriptor is not closed when Lock fails (store.go:103-106)", tries, leaked)
	}
}

// writeFile says a stale or planted temporary file is removed first. A
// directory planted (offline, on the host's disk) at a blob's fixed
// temporary name is not: Unlinkat(..., 0) fails with EISDIR, and from then
// on every Save of that blob fails, although Open accepted the directory.
// With os.CreateTemp's random names nothing at a fixed name could do this.
func TestReview5PlantedTemporaryDirectory(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t, "aes-256-gcm", 7)
	s := mustOpen(t, dir, k)
	if err := s.Save("permall", []byte("v1")); err != nil {
		t.Fatal(err)
	}
	s.Close()
	// The host, offline: a directory (non-empty, so rmdir would not do
	// either) at the temporary names.
	for _, n := range []string{".cvtpm.permall.tmp", ".cvtpm.manifest.tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, n, "x"), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s = mustOpen(t, dir, k) // accepted: nothing looks wrong at Open
	if err := s.Save("permall", []byte("v2")); err != nil {
		t.Errorf("Save with a directory planted at the temporary name: %v", err)
	}
}

// The per-Key AEAD cache is filled by open() with the blob id taken from
// the (not yet authenticated) header. The key id in a header is not
// secret (every sealed file and every migration blob carries it), so
// whoever feeds Key.Open (SET_STATEBLOB with --migration-key in `cvtpm
// socket`) or a state file makes the Key derive and keep one more AEAD per
// blob id it invents: up to 65536 of them, never released.
func TestReview5AEADCacheGrowsWithForgedBlobIDs(t *testing.T) {
	k := mustKey(t, "aes-256-gcm", 9)
	genuine, err := k.Seal([]byte("state"))
	if err != nil {
		t.Fatal(err)
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for id := range 2000 {
		forged := bytes.Clone(genuine)
		binary.BigEndian.PutUint16(forged[12:], uint16(id)) // blob id
		if _, err := k.Open(forged); err == nil {
			t.Fatal("a forged blob opened")
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	k.mu.Lock()
	n := len(k.aeads)
	k.mu.Unlock()
	t.Logf("heap held after the forged opens: %d KiB (%d bytes per cached AEAD)", (int64(after.HeapAlloc)-int64(before.HeapAlloc))/1024, (int64(after.HeapAlloc)-int64(before.HeapAlloc))/int64(max(n, 1)))
	// blobIDs holds the store's names; migration and transfer add a few.
	if n > len(blobIDs)+2 {
		t.Errorf("after 2000 forged blobs that all failed authentication the Key caches %d AEADs (one per invented blob id): the cache is keyed by unauthenticated input and unbounded (key.go:102-123, format.go:178)", n)
	}
}
