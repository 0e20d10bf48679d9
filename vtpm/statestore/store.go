// Package statestore keeps one TPM's state directory: libtpms' permanent,
// volatile and savestate blobs, sealed at rest and crash-safe.
//
// Every blob is one file, cvtpm.<name>, written atomically (temp file,
// fsync, rename, directory fsync), so a kill -9 at any instant leaves either
// the old or the new file. Each file starts with a header (magic, format
// version, cipher, blob id, generation, payload length, nonce, key id; see
// format.go) that is authenticated with the payload: AES-256-GCM or SM4-GCM
// under a per-blob key derived from the master key with HKDF, or, without a
// key, a SHA-256 checksum that still detects truncation and corruption.
//
// Rollback: every Save takes the next store-wide generation and, after the
// blob is in place, records it in a sealed manifest (cvtpm.manifest). A blob
// older than the manifest says is refused as rolled back; a blob newer than
// the manifest is the trace of a crash between the two renames and is
// accepted. Rolling back the whole directory consistently (manifest and
// blobs together) cannot be detected from inside it: that needs a monotonic
// counter outside the directory, which Generation exposes for a key broker
// to anchor.
package statestore

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"golang.org/x/sys/unix"

	"cvtpm/internal/dirlock"
	"cvtpm/vtpm/swtpmblob"
)

const manifestName = "manifest"

// Options configures Open.
type Options struct {
	// Key seals the state; nil keeps it unencrypted (still framed and
	// checksummed).
	Key *Key
	// Lock takes the directory's exclusive lock at Open.
	Lock bool
	// Locked is the directory's lock, taken already (LockDir): Open
	// keeps it as if Lock had taken it, and releases it if it fails.
	Locked *dirlock.Lock
	// ImportSwtpm imports swtpm's unencrypted state files (tpm2-00.*) into
	// a directory with no cvtpm state. Without it such files are ignored
	// when there is no Key, and refused with a Key: plaintext state
	// appearing in a sealed directory is the host's, not the tenant's.
	ImportSwtpm bool
	// MustExist refuses a sealed directory without state: for an instance
	// known to exist, a host that deleted its files would otherwise get a
	// fresh TPM in its place.
	MustExist bool
	// DeferManifest writes a new sealed store's manifest with its first
	// blob (Save writes the manifest after every blob) instead of at
	// Open. A backend creating an instance sets it, saving a synced write:
	// a crash before the first blob then leaves a directory that a later
	// Open with MustExist refuses, which is what an unfinished creation
	// should be.
	DeferManifest bool
	Logger        *slog.Logger
}

// Store is one TPM's state directory. It is safe for concurrent use.
type Store struct {
	dir   string
	key   *Key
	log   *slog.Logger
	mu    sync.Mutex
	gen   uint64                   // highest generation written or seen
	blobs map[string]manifestEntry // what the manifest records
	lock  *dirlock.Lock
	buf   []byte // the file being written, reused from one write to the next
	dirFD int    // the directory, open for writeFile and syncDir; -1 once closed
	// tmpSuffix ends this store's temporary file names: random per Open,
	// so that nothing planted in the directory beforehand, and no other
	// writer, can sit at the name a write is about to create.
	tmpSuffix string
}

type manifestEntry struct {
	gen     uint64
	present bool
}

// Open opens (creating if needed) the state directory dir. It reads and
// authenticates the manifest and every blob, so a wrong key, a tampered or
// truncated file, or a rolled-back blob is refused here, before anything is
// written. A directory with swtpm's unencrypted state files and no cvtpm state
// yet is imported (swtpmblob format).
func Open(dir string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		opts.Locked.Release()
		return nil, fmt.Errorf("state directory: %w", err)
	}
	dirFD, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		opts.Locked.Release()
		return nil, fmt.Errorf("state directory %s: %w", dir, err)
	}
	var tag [4]byte
	rand.Read(tag[:])
	s := &Store{dir: dir, dirFD: dirFD, tmpSuffix: "." + hex.EncodeToString(tag[:]) + ".tmp", key: opts.Key, log: log, blobs: map[string]manifestEntry{}}
	s.lock = opts.Locked
	if opts.Lock {
		if err := s.Lock(); err != nil {
			s.Close()
			return nil, err
		}
	}
	if err := s.load(); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.checkOrigin(opts); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// ErrNoManifest: sealed blobs without the manifest that records them, or
// no sealed state where some was expected.
var ErrNoManifest = errors.New("no sealed manifest")

// checkOrigin refuses sealed state whose manifest is gone and state that
// appeared from outside, imports swtpm state when asked, and starts a
// sealed store with its manifest so that every later blob is recorded.
func (s *Store) checkOrigin(opts Options) error {
	_, manifestErr := os.Stat(s.path(manifestName))
	hasManifest := manifestErr == nil
	var blobs []string
	for name := range blobIDs {
		if _, err := os.Stat(s.path(name)); err == nil && name != manifestName {
			blobs = append(blobs, s.path(name))
		}
	}
	sort.Strings(blobs)
	swtpmFiles, _ := filepath.Glob(filepath.Join(s.dir, "tpm2-00.*"))
	switch {
	case s.key != nil && !hasManifest && len(blobs) > 0:
		return fmt.Errorf("%s: %w: %s present but %s missing (deleted or tampered); refusing the directory", s.dir, ErrNoManifest, blobs[0], s.path(manifestName))
	case hasManifest || len(blobs) > 0:
		return nil
	case opts.ImportSwtpm && len(swtpmFiles) > 0:
		if err := s.importSwtpm(); err != nil {
			return err
		}
	case s.key != nil && len(swtpmFiles) > 0:
		return fmt.Errorf("%s: holds unencrypted swtpm state (%s) and no sealed state: refusing to import it implicitly", s.dir, filepath.Base(swtpmFiles[0]))
	case s.key != nil && opts.MustExist:
		return fmt.Errorf("%s: %w: the sealed state is missing (deleted?); refusing to start a new TPM in its place", s.dir, ErrNoManifest)
	}
	if s.key != nil && s.gen == 0 && len(s.blobs) == 0 && !opts.DeferManifest {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.writeManifest()
	}
	return nil
}

func (s *Store) path(name string) string { return filepath.Join(s.dir, fileName(name)) }

// fileName is a blob's file name in the state directory.
func fileName(name string) string { return "cvtpm." + name }

func blobID(name string) (uint16, error) {
	id, ok := blobIDs[name]
	if !ok || name == manifestName {
		return 0, fmt.Errorf("unknown state blob %q (want permall, volatilestate or savestate)", name)
	}
	return id, nil
}

// load reads the manifest and checks every blob against it.
func (s *Store) load() error {
	b, err := readRegular(s.path(manifestName))
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("state directory: %w", err)
	default:
		plain, gen, err := open(s.key, blobIDs[manifestName], b)
		if err != nil {
			return fmt.Errorf("%s: %w", s.path(manifestName), err)
		}
		if s.blobs, err = parseManifest(plain); err != nil {
			return fmt.Errorf("%s: %w", s.path(manifestName), err)
		}
		s.gen = gen
	}
	for name := range blobIDs {
		if name == manifestName {
			continue
		}
		_, gen, err := s.read(name)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return err
		}
		s.gen = max(s.gen, gen)
	}
	return nil
}

// importSwtpm imports the unencrypted state files (tpm2-00.<name>) that swtpm
// or swtpm_setup wrote into an empty store; the originals are kept.
func (s *Store) importSwtpm() error {
	for _, name := range []string{"permall", "volatilestate", "savestate"} {
		src := filepath.Join(s.dir, "tpm2-00."+name)
		raw, err := readRegular(src)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("importing swtpm state: %w", err)
		}
		// swtpm's tpm2-00.* files are unencrypted state blobs.
		plain, err := swtpmblob.Decode(raw, nil)
		if err != nil {
			return fmt.Errorf("importing swtpm state %s: %w", src, err)
		}
		if err := s.Save(name, plain); err != nil {
			return fmt.Errorf("importing swtpm state %s: %w", src, err)
		}
		s.log.Info("imported swtpm state; the original file is kept", "file", src, "blob", name)
	}
	return nil
}

// read opens one blob file and checks it against the manifest. A missing
// file returns an error satisfying errors.Is(err, fs.ErrNotExist).
func (s *Store) read(name string) ([]byte, uint64, error) {
	id, err := blobID(name)
	if err != nil {
		return nil, 0, err
	}
	p := s.path(name)
	entry, listed := s.blobs[name]
	b, err := readRegular(p)
	if errors.Is(err, fs.ErrNotExist) {
		if listed && entry.present {
			return nil, 0, fmt.Errorf("%s: %w: missing, but the manifest records generation %d", p, ErrRolledBack, entry.gen)
		}
		return nil, 0, fmt.Errorf("state blob %s: %w", name, fs.ErrNotExist)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("state blob %s: %w", name, err)
	}
	plain, gen, err := open(s.key, id, b)
	if err != nil {
		return nil, 0, fmt.Errorf("%s: %w", p, err)
	}
	if listed {
		switch {
		case !entry.present && gen <= entry.gen:
			// Deleted in the manifest; the file outlived a crash before
			// its removal.
			return nil, 0, fmt.Errorf("state blob %s: %w", name, fs.ErrNotExist)
		case entry.present && gen < entry.gen:
			return nil, 0, fmt.Errorf("%s: %w: generation %d < expected %d", p, ErrRolledBack, gen, entry.gen)
		}
	}
	return plain, gen, nil
}

// Load returns a blob ("permall", "volatilestate" or "savestate").
func (s *Store) Load(name string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	plain, _, err := s.read(name)
	return plain, err
}

// Save replaces a blob atomically and durably, then records its generation.
func (s *Store) Save(name string, data []byte) error {
	id, err := blobID(name)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	gen := s.gen + 1
	b, err := sealTo(s.buf, s.key, id, gen, data)
	s.buf = b
	if err != nil {
		return fmt.Errorf("sealing %s: %w", name, err)
	}
	if err := s.writeFile(fileName(name), b); err != nil {
		return err
	}
	s.gen = gen
	s.blobs[name] = manifestEntry{gen: gen, present: true}
	return s.writeManifest()
}

// Delete removes a blob; a missing blob is not an error. The manifest
// records the deletion first, so a crash before the file is gone leaves a
// stale file that reads as absent.
func (s *Store) Delete(name string) error {
	if _, err := blobID(name); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, statErr := os.Stat(s.path(name))
	if e, ok := s.blobs[name]; (!ok || !e.present) && errors.Is(statErr, fs.ErrNotExist) {
		return nil
	}
	s.gen++
	s.blobs[name] = manifestEntry{gen: s.gen, present: false}
	if err := s.writeManifest(); err != nil {
		return err
	}
	if err := os.Remove(s.path(name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting state blob %s: %w", name, err)
	}
	return s.syncDir()
}

// RaiseGeneration makes the store's generation at least gen (recorded in
// the manifest), so that state taken from this store before gen can no
// longer be brought back (vtpm/migration calls it after loading state of
// generation gen from another backend).
func (s *Store) RaiseGeneration(gen uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if gen <= s.gen {
		return nil
	}
	s.gen = gen
	return s.writeManifest()
}

// Generation is the store's current generation: it grows with every Save
// and Delete. An external monotonic counter anchored to it detects a
// rollback of the whole directory.
func (s *Store) Generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

func (s *Store) writeManifest() error {
	b, err := sealTo(s.buf, s.key, blobIDs[manifestName], s.gen, marshalManifest(s.blobs))
	s.buf = b
	if err != nil {
		return fmt.Errorf("sealing the manifest: %w", err)
	}
	return s.writeFile(fileName(manifestName), b)
}

// Manifest payload: entries of u16 blob id, u64 generation, u8 present.
func marshalManifest(m map[string]manifestEntry) []byte {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	sort.Strings(names)
	var b []byte
	for _, n := range names {
		e := m[n]
		b = binary.BigEndian.AppendUint16(b, blobIDs[n])
		b = binary.BigEndian.AppendUint64(b, e.gen)
		p := byte(0)
		if e.present {
			p = 1
		}
		b = append(b, p)
	}
	return b
}

func parseManifest(b []byte) (map[string]manifestEntry, error) {
	const entryLen = 11
	if len(b)%entryLen != 0 {
		return nil, fmt.Errorf("%w: manifest length %d", ErrCorrupt, len(b))
	}
	names := map[uint16]string{}
	for n, id := range blobIDs {
		names[id] = n
	}
	m := map[string]manifestEntry{}
	for ; len(b) > 0; b = b[entryLen:] {
		name, ok := names[binary.BigEndian.Uint16(b)]
		if !ok || name == manifestName || b[10] > 1 {
			return nil, fmt.Errorf("%w: bad manifest entry", ErrCorrupt)
		}
		m[name] = manifestEntry{gen: binary.BigEndian.Uint64(b[2:]), present: b[10] == 1}
	}
	return m, nil
}

// writeFile replaces the blob file name ("cvtpm.permall", ...) with b: a
// temporary file beside it, fsync, rename, fsync of the directory. It uses
// system calls on the directory descriptor the store keeps open, because
// a worker writes its state at every write to the TPM's NV: os.CreateTemp,
// os.Rename and opening the directory to sync it left about 2 KiB of
// garbage each time, which an idle worker then holds. The temporary name
// carries the store's random suffix and is created exclusively, never
// through a symbolic link.
func (s *Store) writeFile(name string, b []byte) error {
	path := filepath.Join(s.dir, name)
	if s.dirFD < 0 {
		return fmt.Errorf("writing %s: the store is closed", path)
	}
	tmp := "." + name + s.tmpSuffix
	fd, err := unix.Openat(s.dirFD, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	err = writeAll(fd, b)
	if err == nil {
		if err = unix.Fsync(fd); err != nil {
			err = fmt.Errorf("syncing: %w", err)
		}
	}
	if cerr := unix.Close(fd); err == nil && cerr != nil {
		err = cerr
	}
	if err == nil {
		if err = unix.Renameat(s.dirFD, tmp, s.dirFD, name); err != nil {
			err = fmt.Errorf("replacing it: %w", err)
		}
	}
	if err != nil {
		unix.Unlinkat(s.dirFD, tmp, 0)
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return s.syncDir()
}

// readRegular reads a state file, refusing anything but a regular file:
// a FIFO planted in the directory would otherwise block the read for
// ever, and a device or a directory is no state either.
func readRegular(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file (%v)", ErrFormat, path, fi.Mode().Type())
	}
	b := make([]byte, 0, fi.Size())
	for {
		n, err := f.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return nil, err
		}
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)] // it grew since the stat
		}
	}
}

// writeAll writes b to fd, through short writes and interruptions.
func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// syncDir makes the directory's entries (a rename, a removal) durable.
func (s *Store) syncDir() error {
	if s.dirFD < 0 {
		return fmt.Errorf("syncing state directory %s: the store is closed", s.dir)
	}
	if err := unix.Fsync(s.dirFD); err != nil {
		return fmt.Errorf("syncing state directory %s: %w", s.dir, err)
	}
	return nil
}

// Lock takes the directory's exclusive lock (swtpm's --tpmstate ...,lock and
// CMD_LOCK_STORAGE). It fails at once if another process holds it.
func (s *Store) Lock() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lock != nil {
		return nil
	}
	l, err := LockDir(s.dir)
	if err != nil {
		return err
	}
	s.lock = l
	return nil
}

// LockDir takes dir's exclusive lock before its state is opened (Options
// Locked), for a server that must not touch anything else of an
// instance, its sockets say, while another process serves it. It fails at
// once if another process holds it.
func LockDir(dir string) (*dirlock.Lock, error) {
	l, err := dirlock.Take(dir)
	var inUse *dirlock.InUseError
	switch {
	case errors.As(err, &inUse):
		return nil, fmt.Errorf("state directory %s is in use by %s", dir, inUse.Holder)
	case err != nil:
		return nil, fmt.Errorf("locking state directory: %w", err)
	}
	return l, nil
}

// Unlock releases the directory lock.
func (s *Store) Unlock() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.lock.Release()
	s.lock = nil
	return err
}

// Close releases the lock and the directory. Every Save is already
// durable.
func (s *Store) Close() error {
	err := s.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dirFD >= 0 {
		unix.Close(s.dirFD)
		s.dirFD = -1
	}
	return err
}
