package statestore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

const writerEnv = "CVTPM_STATESTORE_WRITER"

// TestMain lets the test binary act as the writer process that
// TestKillDuringWrites kills.
func TestMain(m *testing.M) {
	if dir := os.Getenv(writerEnv); dir != "" {
		runWriter(dir, os.Getenv(writerEnv+"_KEY") == "1")
		return
	}
	os.Exit(m.Run())
}

func crashKey() *Key {
	k, _ := NewKey(bytes.Repeat([]byte{0x5a}, 32), "sm4-gcm")
	return k
}

// crashBlob is value i followed by filler, so a torn write would show.
func crashBlob(i uint64) []byte {
	b := binary.BigEndian.AppendUint64(nil, i)
	return append(b, bytes.Repeat([]byte{byte(i)}, 3000+int(i%1000))...)
}

func runWriter(dir string, sealed bool) {
	var k *Key
	if sealed {
		k = crashKey()
	}
	s, err := Open(dir, Options{Key: k})
	if err != nil {
		fmt.Fprintln(os.Stderr, "writer:", err)
		os.Exit(3)
	}
	start := uint64(0)
	if b, err := s.Load("permall"); err == nil {
		start = binary.BigEndian.Uint64(b) + 1
	}
	fmt.Println("ready")
	for i := start; ; i++ {
		if err := s.Save("permall", crashBlob(i)); err != nil {
			fmt.Fprintln(os.Stderr, "writer:", err)
			os.Exit(4)
		}
		if i%3 == 0 {
			s.Save("volatilestate", crashBlob(i))
		}
		if i%7 == 0 {
			s.Delete("volatilestate")
		}
	}
}

// TestKillDuringWrites kills a writer with SIGKILL at random instants; after
// every kill the directory must open and hold a complete value.
func TestKillDuringWrites(t *testing.T) {
	for _, sealed := range []bool{false, true} {
		t.Run("sealed="+strconv.FormatBool(sealed), func(t *testing.T) {
			dir := t.TempDir()
			var k *Key
			if sealed {
				k = crashKey()
			}
			last := int64(-1)
			for round := range 15 {
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), writerEnv+"="+dir, writerEnv+"_KEY="+map[bool]string{true: "1"}[sealed])
				out, _ := cmd.StdoutPipe()
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				ready := make([]byte, 6)
				if _, err := out.Read(ready); err != nil {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("round %d: writer did not start", round)
				}
				time.Sleep(time.Duration(rand.IntN(40000)) * time.Microsecond)
				cmd.Process.Kill()
				cmd.Wait()

				s, err := Open(dir, Options{Key: k})
				if err != nil {
					t.Fatalf("round %d: Open after kill: %v", round, err)
				}
				b, err := s.Load("permall")
				if errors.Is(err, fs.ErrNotExist) && last < 0 {
					s.Close()
					continue
				}
				if err != nil {
					t.Fatalf("round %d: Load after kill: %v", round, err)
				}
				v := binary.BigEndian.Uint64(b)
				if !bytes.Equal(b, crashBlob(v)) {
					t.Fatalf("round %d: torn value %d", round, v)
				}
				if int64(v) < last {
					t.Fatalf("round %d: value went back from %d to %d", round, last, v)
				}
				last = int64(v)
				if _, err := s.Load("volatilestate"); err != nil && !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("round %d: volatilestate: %v", round, err)
				}
				s.Close()
			}
			if last < 1 {
				t.Fatalf("the writer never completed a save")
			}
		})
	}
}
