package cliconf

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestApply(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "v.conf")
	os.WriteFile(conf, []byte("# a verifier\nlisten = 127.0.0.1:9\ncrl = a\ncrl = b # two\nno-crl = false\n\nkey k.pem\n"), 0o600)
	newFS := func() (*flag.FlagSet, *string, *[]string, *string) {
		fs := flag.NewFlagSet("cvtpm verifier", flag.ContinueOnError)
		listen := fs.String("listen", "", "")
		var crls []string
		fs.Func("crl", "", func(v string) error { crls = append(crls, v); return nil })
		fs.Bool("no-crl", true, "")
		key := fs.String("key", "", "")
		return fs, listen, &crls, key
	}
	fs, listen, crls, key := newFS()
	args := []string{"--config", conf, "--listen", "127.0.0.1:10"}
	if err := Apply(fs, args); err != nil {
		t.Fatal(err)
	}
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	if *listen != "127.0.0.1:10" || strings.Join(*crls, ",") != "a,b" || *key != "k.pem" {
		t.Fatalf("listen %q crls %v key %q", *listen, *crls, *key)
	}
	for _, tc := range []struct{ body, want string }{
		{"listne = x\n", `line 1: "listne" is not a flag`},
		{"no-crl = maybe\n", "line 1: no-crl"},
		{"=x\n", "line 1: want"},
		{"config = other\n", "do not include"},
	} {
		os.WriteFile(conf, []byte(tc.body), 0o600)
		fs, _, _, _ := newFS()
		if err := Apply(fs, []string{"--config=" + conf}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.body, err, tc.want)
		}
	}
	fs, _, _, _ = newFS()
	if err := Apply(fs, []string{"--config", filepath.Join(dir, "missing")}); err == nil || !strings.Contains(err.Error(), "--config") {
		t.Errorf("missing file: %v", err)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add([]byte("listen = x\n# c\nkey k\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.String("listen", "", "")
		fs.Bool("b", false, "")
		Load(fs, "f", b)
	})
}

func TestAlias(t *testing.T) {
	for _, args := range [][]string{{"--tls-key", "k.pem"}, {"--key", "k.pem"}} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		key := fs.String("tls-key", "", "the TLS key")
		on := fs.Bool("evidence-certs", false, "")
		Alias(fs, "tls-key", "key")
		Alias(fs, "evidence-certs", "ec")
		if err := fs.Parse(append(args, "--ec")); err != nil || *key != "k.pem" || !*on {
			t.Errorf("%v: %v, tls-key %q, evidence-certs %v", args, err, *key, *on)
		}
	}
}

func TestParseError(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nope"}, "unknown flag --nope (see --help)"},
		{[]string{"--timeout", "soon"}, `--timeout: "soon" is not valid: parse error`},
		{[]string{"--n=x"}, `--n: "x" is not valid: parse error`},
		{[]string{"--on=maybe"}, `--on: "maybe" is not valid: parse error`},
	} {
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.Duration("timeout", 0, "")
		fs.Int("n", 0, "")
		fs.Bool("on", false, "")
		if got := ParseError(fs.Parse(tc.args)); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.args, got, tc.want)
		}
	}
}
