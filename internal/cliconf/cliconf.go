// Package cliconf gives every cvtpm command a configuration file: --config
// FILE sets the command's flags from FILE before the command line is
// read, so a service unit can carry one short ExecStart and the settings
// live in /etc. The file has one flag per line, by the flag's name:
//
//	# /etc/cvtpm/verifier.conf
//	ek-root = /etc/cvtpm/ca.pem
//	crl = http://ca.example:7080/crl
//	crl = http://ca.example:7080/crl/ak   # a repeatable flag, repeated
//	no-crl = false
//
// Flags given on the command line win over the file's.
package cliconf

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Apply registers --config on fs (when it has none) and, if args name a
// file with it, sets fs's flags from that file. Call it before
// fs.Parse(args).
func Apply(fs *flag.FlagSet, args []string) error {
	if fs.Lookup("config") == nil {
		fs.String("config", "", "read flags from this file first: one 'name = value' per line, # comments (command-line flags win)")
	}
	path := ""
	for i, a := range args {
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if !strings.HasPrefix(a, "-") || name != "config" {
			if a == "--" {
				break
			}
			continue
		}
		if !hasVal {
			if i+1 >= len(args) {
				return fmt.Errorf("--config needs a file")
			}
			val = args[i+1]
		}
		path = val
	}
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	return Load(fs, path, b)
}

// Load sets fs's flags from a configuration file's contents (named path
// in errors).
func Load(fs *flag.FlagSet, path string, b []byte) error {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if i := strings.Index(line, "#"); i >= 0 {
			line = line[:i]
		}
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		name, val, ok := strings.Cut(line, "=")
		if !ok {
			name, val, ok = strings.Cut(line, " ")
		}
		name, val = strings.TrimSpace(name), strings.TrimSpace(val)
		if !ok || name == "" {
			return fmt.Errorf("%s line %d: want 'name = value'", path, n)
		}
		if name == "config" {
			return fmt.Errorf("%s line %d: config files do not include others", path, n)
		}
		if fs.Lookup(name) == nil {
			return fmt.Errorf("%s line %d: %q is not a flag of %s", path, n, name, fs.Name())
		}
		if err := fs.Set(name, val); err != nil {
			return fmt.Errorf("%s line %d: %s: %w", path, n, name, err)
		}
	}
	return sc.Err()
}

// Alias registers old as another name of fs's flag name (the same value),
// so scripts and configuration files written for a renamed flag keep
// working. Its help says which name to use.
func Alias(fs *flag.FlagSet, name, old string) {
	f := fs.Lookup(name)
	if f == nil {
		panic("cliconf.Alias: no flag " + name)
	}
	fs.Var(f.Value, old, "old name of --"+name+" (still accepted)")
}

var (
	unknownFlag = regexp.MustCompile(`^flag provided but not defined: -+(.*)$`)
	badValue    = regexp.MustCompile(`^invalid (?:boolean )?value (".*") for (?:flag )?-+([^:]*): (.*)$`)
)

// ParseError turns the flag package's parse error into one line that
// names the flag as a user types it.
func ParseError(err error) string {
	msg := err.Error()
	if m := unknownFlag.FindStringSubmatch(msg); m != nil {
		return "unknown flag --" + m[1] + " (see --help)"
	}
	if m := badValue.FindStringSubmatch(msg); m != nil {
		return "--" + m[2] + ": " + m[1] + " is not valid: " + m[3]
	}
	return msg + " (see --help)"
}

// Parse is Apply and fs.Parse(args) for a command line a person typed: on
// --help it prints the usage and returns flag.ErrHelp; a bad flag or value
// is an error of one line naming it, without the usage the flag package
// would print after it.
func Parse(fs *flag.FlagSet, args []string) error {
	if err := Apply(fs, args); err != nil {
		return err
	}
	out := fs.Output()
	var buf strings.Builder
	fs.SetOutput(&buf)
	err := fs.Parse(args)
	fs.SetOutput(out)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(out, buf.String())
		return err
	}
	if err != nil {
		return errors.New(ParseError(err))
	}
	return nil
}
