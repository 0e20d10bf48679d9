// Package swtpmsocket is the "socket" command of swtpm 0.7 (and the parts
// of 0.8 libvirt uses), for a TPM 2.0 on libtpms: it parses swtpm's option
// syntax and serves the TPM on swtpm's control and data sockets (and the
// mssim protocol). "cvtpm socket" and the lean cvtpm-swtpm binary both run
// it; the protocol itself is vtpm/swtpmproto.
//
// The "socket" command: a drop-in for "swtpm socket --tpm2". It parses swtpm
// 0.7's socket options, opens the sealed state directory, starts the libtpms
// engine and serves the swtpm control/data channels (and optionally mssim).
package swtpmsocket

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"cvtpm/internal/confine"
	"cvtpm/internal/dirlock"
	"cvtpm/vtpm/engine"
	"cvtpm/vtpm/statestore"
	"cvtpm/vtpm/swtpmproto"
)

// swtpmCompatVersion is the swtpm release whose command line and protocol
// cvtpm socket follows; --print-capabilities reports it so that libvirt's
// version checks treat cvtpm like that swtpm.
const swtpmCompatVersion = "0.7.1"

// endpoint is a --server or --ctrl specification.
type endpoint struct {
	typ        string // "unixio" or "tcp"
	path       string
	port       int // -1 unset
	bindaddr   string
	fd         int // -1 unset
	clientfd   int // -1 unset
	disconnect bool
	mode       os.FileMode // 0 unset
	uid, gid   int         // -1 unset
}

// keySpec is a --key or --migration-key specification.
type keySpec struct {
	file, pwdfile string
	fd, pwdfd     int
	format, mode  string
	kdf           string
	remove        bool
}

type socketConfig struct {
	tpm2         bool
	server, ctrl *endpoint
	mssimPort    int // -1 unset
	mssimBind    string
	stateDir     string
	stateLock    bool
	// --migration (swtpm 0.8, for migration on shared storage):
	// incoming defers the directory lock until the state arrives (the
	// source still holds it); release-lock-outgoing drops it once the
	// last state blob (savestate) has been read.
	migrationIncoming, releaseLockOutgoing bool
	notNeedInit                            bool
	startup                                string // "", "clear", "state", "deactivated", "none"
	pidFile                                string
	pidFD                                  int
	logFile                                string
	logFD                                  int
	logLevel                               int
	logPrefix                              string
	logTruncate                            bool
	key, migrationKey                      *keySpec
	rejectLocality4                        bool
	printCaps                              bool
	printStates                            bool
	daemon                                 bool
	terminate                              bool
	// runas is --runas: the user, a name or a numeric uid, the process
	// becomes before it opens any file (runAs).
	runas         string
	help, version bool
	// seccomp is --seccomp's action: kill (swtpm's default), log or none.
	seccomp string
	// confine installs the seccomp filter (confine.DropIn); Run sets it.
	// nil in tests that serve in their own process, which the filter
	// would kill at their next dial or exec.
	confine func(confine.Mode) error
}

// optParams splits swtpm's "k=v,k2,k3=v3" option value, checking keys
// against allowed. The error names the option and the bad parameter.
func optParams(opt, val string, allowed ...string) (map[string]string, error) {
	m := map[string]string{}
	if val == "" {
		return m, nil
	}
	for _, part := range strings.Split(val, ",") {
		k, v, _ := strings.Cut(part, "=")
		ok := false
		for _, a := range allowed {
			if a == k {
				ok = true
				break
			}
		}
		if !ok {
			return nil, fmt.Errorf("%s: unknown parameter %q", opt, k)
		}
		if _, dup := m[k]; dup {
			return nil, fmt.Errorf("%s: parameter %q given twice", opt, k)
		}
		m[k] = v
	}
	return m, nil
}

func paramInt(opt string, m map[string]string, k string, def, lo, hi int) (int, error) {
	v, ok := m[k]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 0, 64)
	if err != nil || n < int64(lo) || n > int64(hi) {
		return 0, fmt.Errorf("%s: %s=%q is not a number in %d..%d", opt, k, v, lo, hi)
	}
	return int(n), nil
}

func paramMode(opt string, m map[string]string) (os.FileMode, error) {
	v, ok := m["mode"]
	if !ok {
		return 0, nil
	}
	n, err := strconv.ParseUint(v, 8, 32)
	if err != nil || n > 0o7777 {
		return 0, fmt.Errorf("%s: mode=%q is not an octal file mode", opt, v)
	}
	return os.FileMode(n), nil
}

func paramBool(opt string, m map[string]string, k string) (bool, error) {
	switch m[k] {
	case "", "true", "1", "yes":
		_, ok := m[k]
		return ok, nil
	case "false", "0", "no":
		return false, nil
	}
	return false, fmt.Errorf("%s: %s=%q is not true or false", opt, k, m[k])
}

func parseEndpoint(opt, val string) (*endpoint, error) {
	m, err := optParams(opt, val, "type", "path", "port", "bindaddr", "ifname", "fd", "clientfd", "disconnect", "mode", "uid", "gid")
	if err != nil {
		return nil, err
	}
	e := &endpoint{typ: m["type"], path: m["path"], bindaddr: m["bindaddr"]}
	if e.typ == "" {
		e.typ = "tcp"
	}
	if e.typ != "tcp" && e.typ != "unixio" {
		return nil, fmt.Errorf("%s: type=%q: want tcp or unixio", opt, e.typ)
	}
	if _, ok := m["ifname"]; ok {
		return nil, fmt.Errorf("%s: ifname is not supported by cvtpm; use bindaddr", opt)
	}
	if e.port, err = paramInt(opt, m, "port", -1, 0, 65535); err != nil {
		return nil, err
	}
	if e.fd, err = paramInt(opt, m, "fd", -1, 0, 1<<30); err != nil {
		return nil, err
	}
	if e.clientfd, err = paramInt(opt, m, "clientfd", -1, 0, 1<<30); err != nil {
		return nil, err
	}
	if e.uid, err = paramInt(opt, m, "uid", -1, 0, 1<<31-1); err != nil {
		return nil, err
	}
	if e.gid, err = paramInt(opt, m, "gid", -1, 0, 1<<31-1); err != nil {
		return nil, err
	}
	if e.mode, err = paramMode(opt, m); err != nil {
		return nil, err
	}
	_, e.disconnect = m["disconnect"]
	switch {
	case e.fd >= 0 && e.clientfd >= 0:
		return nil, fmt.Errorf("%s: fd and clientfd are mutually exclusive", opt)
	case e.clientfd >= 0 && (opt != "--ctrl" || e.typ != "unixio"):
		return nil, fmt.Errorf("%s: clientfd is only valid for --ctrl type=unixio", opt)
	case e.typ == "unixio" && e.path == "" && e.fd < 0 && e.clientfd < 0:
		return nil, fmt.Errorf("%s: type=unixio needs path= or fd=", opt)
	case e.typ == "unixio" && e.port >= 0:
		return nil, fmt.Errorf("%s: port= is only valid for type=tcp", opt)
	case e.typ == "tcp" && e.path != "":
		return nil, fmt.Errorf("%s: path= is only valid for type=unixio", opt)
	case e.disconnect && opt != "--server":
		return nil, fmt.Errorf("%s: disconnect is only valid for --server", opt)
	}
	if e.bindaddr == "" {
		e.bindaddr = "127.0.0.1"
	}
	return e, nil
}

func parseKeySpec(opt, val string) (*keySpec, error) {
	m, err := optParams(opt, val, "file", "fd", "pwdfile", "pwdfd", "format", "mode", "remove", "kdf")
	if err != nil {
		return nil, err
	}
	k := &keySpec{file: m["file"], pwdfile: m["pwdfile"], format: m["format"], mode: m["mode"], kdf: m["kdf"]}
	if k.fd, err = paramInt(opt, m, "fd", -1, 0, 1<<30); err != nil {
		return nil, err
	}
	if k.pwdfd, err = paramInt(opt, m, "pwdfd", -1, 0, 1<<30); err != nil {
		return nil, err
	}
	if k.remove, err = paramBool(opt, m, "remove"); err != nil {
		return nil, err
	}
	sources := 0
	for _, set := range []bool{k.file != "", k.fd >= 0, k.pwdfile != "", k.pwdfd >= 0} {
		if set {
			sources++
		}
	}
	if sources != 1 {
		return nil, fmt.Errorf("%s: give exactly one of file=, fd=, pwdfile=, pwdfd=", opt)
	}
	if k.format == "" {
		k.format = "hex"
	}
	if k.format != "hex" && k.format != "binary" {
		return nil, fmt.Errorf("%s: format=%q: want hex or binary", opt, k.format)
	}
	if k.kdf == "" {
		k.kdf = "pbkdf2"
	}
	if k.kdf != "pbkdf2" && k.kdf != "sha512" {
		return nil, fmt.Errorf("%s: kdf=%q: want sha512 or pbkdf2", opt, k.kdf)
	}
	if k.mode == "" {
		k.mode = "aes-256-gcm"
	}
	return k, nil
}

// parseSocketArgs parses swtpm 0.7's socket command line. getenv supplies
// TPM_PATH and TPM_PORT as swtpm reads them.
func parseSocketArgs(args []string, getenv func(string) string) (*socketConfig, error) {
	c := &socketConfig{mssimPort: -1, pidFD: -1, logFD: -1, logLevel: -1, seccomp: "kill"}
	withValue := map[string]bool{
		"server": true, "ctrl": true, "tpmstate": true, "flags": true, "pid": true, "log": true,
		"key": true, "migration-key": true, "migration": true, "locality": true, "seccomp": true, "mssim": true,
		"runas": true, "chroot": true, "port": true, "fd": true,
	}
	short := map[string]string{"h": "help", "d": "daemon", "p": "port", "f": "fd", "r": "runas", "t": "terminate", "v": "version"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		var name, val string
		var hasVal bool
		switch {
		case strings.HasPrefix(a, "--"):
			name, val, hasVal = strings.Cut(a[2:], "=")
		case strings.HasPrefix(a, "-") && len(a) == 2 && short[a[1:]] != "":
			name = short[a[1:]]
		case strings.HasPrefix(a, "-") && len(a) > 2 && a[1] != '-' && withValue[short[a[1:2]]]:
			// getopt's joined value, as swtpm takes it: -rtss, -p2321.
			name, val, hasVal = short[a[1:2]], a[2:], true
		default:
			return nil, fmt.Errorf("unexpected argument %q (options start with --)", a)
		}
		opt := "--" + name
		if withValue[name] && !hasVal {
			if i+1 >= len(args) {
				return nil, fmt.Errorf("%s: missing value", opt)
			}
			i++
			val = args[i]
		} else if !withValue[name] && hasVal {
			return nil, fmt.Errorf("%s takes no value", opt)
		}
		var err error
		switch name {
		case "tpm2":
			c.tpm2 = true
		case "help":
			c.help = true
		case "version":
			c.version = true
		case "daemon":
			c.daemon = true
		case "print-capabilities":
			c.printCaps = true
		case "server":
			c.server, err = parseEndpoint(opt, val)
		case "ctrl":
			c.ctrl, err = parseEndpoint(opt, val)
		case "port": // swtpm -p: a TCP data server that disconnects after each command
			var p int
			if p, err = paramInt(opt, map[string]string{"port": val}, "port", 0, 0, 65535); err == nil {
				c.server = &endpoint{typ: "tcp", port: p, bindaddr: "127.0.0.1", fd: -1, clientfd: -1, disconnect: true, uid: -1, gid: -1}
			}
		case "fd":
			var fd int
			if fd, err = paramInt(opt, map[string]string{"fd": val}, "fd", 0, 0, 1<<30); err == nil {
				c.server = &endpoint{typ: "tcp", port: -1, fd: fd, clientfd: -1, uid: -1, gid: -1}
			}
		case "tpmstate":
			var m map[string]string
			if m, err = optParams(opt, val, "dir", "mode", "lock", "backend-uri"); err != nil {
				break
			}
			if _, err = paramMode(opt, m); err != nil {
				break
			}
			// Locked by default, as swtpm 0.7 does: two processes on one
			// directory would lose each other's NV writes. ",lock" is
			// accepted for compatibility.
			c.stateLock = true
			c.stateDir = m["dir"]
			if uri, ok := m["backend-uri"]; ok {
				if dir, isDir := strings.CutPrefix(uri, "dir://"); isDir && c.stateDir == "" {
					c.stateDir = dir
				} else {
					err = fmt.Errorf("%s: backend-uri=%q is not supported: cvtpm keeps state in a directory (dir=...)", opt, uri)
				}
			}
		case "flags":
			var m map[string]string
			if m, err = optParams(opt, val, "not-need-init", "startup-clear", "startup-state", "startup-deactivated", "startup-none", "disable-auto-shutdown"); err != nil {
				break
			}
			_, c.notNeedInit = m["not-need-init"]
			for _, s := range []string{"clear", "state", "deactivated", "none"} {
				if _, ok := m["startup-"+s]; ok {
					if c.startup != "" {
						err = fmt.Errorf("%s: only one startup-... flag may be given", opt)
					}
					c.startup = s
				}
			}
			if c.startup == "deactivated" {
				err = fmt.Errorf("%s: startup-deactivated is a TPM 1.2 startup type; cvtpm is TPM 2.0 only", opt)
			}
		case "pid":
			var m map[string]string
			if m, err = optParams(opt, val, "file", "fd"); err != nil {
				break
			}
			c.pidFile = m["file"]
			if c.pidFD, err = paramInt(opt, m, "fd", -1, 0, 1<<30); err == nil && (c.pidFile == "") == (c.pidFD < 0) {
				err = fmt.Errorf("%s: give exactly one of file= and fd=", opt)
			}
		case "log":
			var m map[string]string
			if m, err = optParams(opt, val, "file", "fd", "level", "prefix", "truncate"); err != nil {
				break
			}
			c.logFile, c.logPrefix = m["file"], m["prefix"]
			_, c.logTruncate = m["truncate"]
			if c.logFD, err = paramInt(opt, m, "fd", -1, 0, 1<<30); err != nil {
				break
			}
			if c.logLevel, err = paramInt(opt, m, "level", -1, 0, 1000); err != nil {
				break
			}
			if c.logFile != "" && c.logFD >= 0 {
				err = fmt.Errorf("%s: file= and fd= are mutually exclusive", opt)
			}
		case "key":
			c.key, err = parseKeySpec(opt, val)
		case "migration-key":
			c.migrationKey, err = parseKeySpec(opt, val)
		case "migration":
			var m map[string]string
			if m, err = optParams(opt, val, "incoming", "release-lock-outgoing"); err != nil {
				break
			}
			_, c.migrationIncoming = m["incoming"]
			_, c.releaseLockOutgoing = m["release-lock-outgoing"]
		case "locality":
			var m map[string]string
			if m, err = optParams(opt, val, "reject-locality-4", "allow-set-locality"); err != nil {
				break
			}
			_, c.rejectLocality4 = m["reject-locality-4"]
			if _, ok := m["allow-set-locality"]; ok {
				err = fmt.Errorf("%s: allow-set-locality (the in-band TPM2 SetLocality command) is not supported; use the control channel's SET_LOCALITY or the TPM_SEND_COMMAND prefix", opt)
			}
		case "seccomp":
			var m map[string]string
			if m, err = optParams(opt, val, "action"); err != nil {
				break
			}
			switch a := m["action"]; a {
			case "none", "log", "kill":
				c.seccomp = a
			default:
				err = fmt.Errorf("%s: action=%q: want none, log or kill", opt, a)
			}
		case "mssim":
			var m map[string]string
			if m, err = optParams(opt, val, "port", "bindaddr"); err != nil {
				break
			}
			if c.mssimPort, err = paramInt(opt, m, "port", -1, 1, 65534); err == nil && c.mssimPort < 0 {
				err = fmt.Errorf("%s: port= is required", opt)
			}
			c.mssimBind = m["bindaddr"]
			if c.mssimBind == "" {
				c.mssimBind = "127.0.0.1"
			}
		case "runas":
			if val == "" {
				err = fmt.Errorf("%s: no user given", opt)
			}
			c.runas = val
		case "chroot":
			err = fmt.Errorf("%s is not supported (swtpm 0.7 has no such option): confine the process with a mount namespace or a service manager instead", opt)
		case "terminate":
			c.terminate = true
		case "print-states":
			c.printStates = true
		default:
			err = fmt.Errorf("unknown option %s", opt)
		}
		if err != nil {
			return nil, err
		}
	}
	if c.stateDir == "" {
		c.stateDir = getenv("TPM_PATH")
		c.stateLock = true // as for --tpmstate: one process per directory
	}
	if c.server != nil && c.server.typ == "tcp" && c.server.port < 0 && c.server.fd < 0 {
		p, err := strconv.Atoi(getenv("TPM_PORT"))
		if err != nil || p < 0 || p > 65535 {
			return nil, errors.New("--server: no valid port= for type=tcp (nor TPM_PORT)")
		}
		c.server.port = p
	}
	if c.ctrl != nil && c.ctrl.typ == "tcp" && c.ctrl.port < 0 && c.ctrl.fd < 0 {
		return nil, errors.New("--ctrl: type=tcp needs port= or fd=")
	}
	if c.help || c.version || c.printCaps {
		return c, nil
	}
	if c.printStates {
		if c.stateDir == "" {
			return nil, errors.New("--print-states: --tpmstate dir= (or backend-uri=dir://) is required")
		}
		return c, nil
	}
	if !c.tpm2 {
		return nil, errors.New("--tpm2 is required: cvtpm emulates TPM 2.0 only")
	}
	if c.stateDir == "" {
		return nil, errors.New("--tpmstate: dir= is required (or set TPM_PATH)")
	}
	return c, nil
}

const socketUsage = `Usage: cvtpm socket --tpm2 [options]   (also: swtpm socket --tpm2 ...)

A TPM 2.0 (libtpms) served over swtpm's control and data channels.

--tpm2                 required: TPM 2.0 (the only kind cvtpm emulates)
--server type=tcp[,port=P][,bindaddr=A][,fd=F][,disconnect]
--server type=unixio[,path=P][,fd=F][,mode=0...][,uid=U][,gid=G]
                       data channel (raw TPM commands or TPM_SEND_COMMAND framing)
--ctrl type=unixio[,path=P][,fd=F|clientfd=F][,mode=0...][,uid=U][,gid=G]
--ctrl type=tcp[,port=P][,bindaddr=A][,fd=F]
                       control channel (swtpm's tpm_ioctl protocol)
--mssim port=P[,bindaddr=A]
                       Microsoft simulator protocol: commands on P, platform on P+1
--tpmstate dir=D[,mode=0...][,lock]
                       state directory (sealed, crash-safe); TPM_PATH also works
--flags [not-need-init][,startup-clear|startup-state|startup-none][,disable-auto-shutdown]
--key file=F|fd=N[,format=hex|binary][,mode=aes-256-gcm|sm4-gcm][,remove=true|false]
--key pwdfile=F|pwdfd=N[,mode=...][,kdf=sha512|pbkdf2]
                       key sealing the state at rest
--migration-key ...    same forms; seals state blobs sent by GET_STATEBLOB
--migration [incoming][,release-lock-outgoing]
                       migration on shared storage: incoming takes the state
                       directory's lock only when the state arrives (or at
                       INIT); release-lock-outgoing releases it once the
                       savestate blob has been read
-r, --runas USER       become USER (a name, or a numeric uid whose group is
                       the same number) before opening any file: sockets,
                       state, pid and log files are then that user's; needs
                       root. Supplementary groups become USER's (none for a
                       number); no capability is left (a start that would
                       keep one is refused)
--pid file=F|fd=N      write the process ID
--log file=F|fd=N[,level=n][,prefix=S][,truncate]
--locality reject-locality-4
--seccomp action=kill|log|none
                       once the sockets listen, before the state is read,
                       the process keeps only the system calls serving
                       takes (an allow-list, internal/confine: no exec,
                       socket, connect, ioctl, executable memory, ptrace
                       or signals to others); any other call kills it (kill,
                       the default, as swtpm's), is logged by the kernel
                       and allowed (log), or no filter is installed
                       (none). Unless none, from the start (Landlock)
                       no file beneath /proc or /sys opens for writing,
                       and files are created, written, truncated,
                       renamed or removed only beneath the state
                       directory (created first if missing), in the pid
                       and log files and /dev/null; sockets are made and
                       files removed in the sockets' directories, the
                       pid file removed in its own. Whatever the action,
                       descriptors the process inherited, no option
                       names (fd=, clientfd=, pwdfd=, --pid fd=, --log
                       fd=) and that hold no lock are closed first
--print-capabilities   print swtpm-style capabilities JSON and exit
--daemon               run in the background once the sockets listen
-t, --terminate        exit when the data connection is lost
-h, --help             this text
--version              print the version
`

// Run is "swtpm socket ARGS...": args are swtpm's options (after the
// word "socket").
func Run(ctx context.Context, args []string) error {
	cfg, err := parseSocketArgs(args, os.Getenv)
	if err != nil {
		return err
	}
	switch {
	case cfg.help:
		fmt.Print(socketUsage)
		return nil
	case cfg.version:
		fmt.Printf("cvtpm socket, compatible with swtpm %s (TPM 2.0, libtpms)\n", swtpmCompatVersion)
		return nil
	case cfg.printCaps:
		return printCapabilities(os.Stdout)
	}
	if cfg.daemon && !cfg.printStates && os.Getenv(daemonReadyEnv) == "" {
		return daemonize(args) // the background process changes user, not this one
	}
	if cfg.runas != "" {
		if err := runAs(cfg.runas); err != nil {
			return err
		}
	}
	if cfg.printStates {
		return printStates(os.Stdout, cfg.stateDir)
	}
	cfg.confine = confine.DropIn
	return serveSocket(ctx, cfg)
}

// printCapabilities prints swtpm's --print-capabilities JSON listing only
// the features cvtpm really has.
func printCapabilities(w io.Writer) error {
	features := []string{"tpm-2.0", "tpm-send-command-header", "flags-opt-startup",
		"cmdarg-seccomp", "cmdarg-print-states", "cmdarg-migration", "nvram-backend-dir"}
	if sealedStateSupported {
		features = append(features, "cmdarg-key-fd", "cmdarg-pwd-fd")
	}
	// libtpms 0.9 reports the RSA key sizes it supports.
	features = append(features, "rsa-keysize-1024", "rsa-keysize-2048", "rsa-keysize-3072")
	b, err := json.Marshal(struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}{"swtpm", features, swtpmCompatVersion})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

// printStates prints swtpm's --print-states JSON: the state blobs the
// directory holds (cvtpm's own files, or swtpm's that cvtpm would import),
// which swtpm_setup asks before it creates a TPM (--not-overwrite).
func printStates(w io.Writer, dir string) error {
	type state struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
	}
	states := []state{}
	for _, name := range []string{"permall", "volatilestate", "savestate"} {
		for _, file := range []string{"cvtpm." + name, "tpm2-00." + name} {
			fi, err := os.Stat(filepath.Join(dir, file))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				// Unreadable is not absent: swtpm_setup --not-overwrite
				// and libvirt would take it for "no state here".
				return fmt.Errorf("--print-states: %w", err)
			}
			if err == nil && fi.Mode().IsRegular() {
				states = append(states, state{name, fi.Size()})
				break
			}
		}
	}
	b, err := json.Marshal(struct {
		Type   string  `json:"type"`
		States []state `json:"states"`
	}{"swtpm", states})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

const daemonReadyEnv = "CVTPM_DAEMON_READY_FD"

// ExitError is an exit status the command ends with, its message already
// printed (or none due).
type ExitError int

func (e ExitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// daemonize re-executes this binary detached (Go cannot fork) and returns
// once the child reports that its sockets listen and the pid file exists.
func daemonize(args []string) error {
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	defer r.Close()
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("--daemon: finding own executable: %w", err)
	}
	devnull, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("--daemon: %w", err)
	}
	defer devnull.Close()
	cmd := exec.Command(self, append([]string{"socket"}, args...)...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), daemonReadyEnv+"=3")
	cmd.Stdin, cmd.Stdout = devnull, devnull
	cmd.Stderr = os.Stderr // errors before readiness still reach the caller
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("--daemon: starting background process: %w", err)
	}
	w.Close()
	var b [1]byte
	if n, _ := r.Read(b[:]); n != 1 {
		cmd.Wait()
		return ExitError(1)
	}
	cmd.Process.Release()
	return nil
}

func newLogger(cfg *socketConfig) (*slog.Logger, func(), error) {
	var w io.Writer = os.Stderr
	closer := func() {}
	level := slog.LevelError // by default only errors, on stderr
	switch {
	case cfg.logFile == "-":
		return slog.New(slog.DiscardHandler), closer, nil
	case cfg.logFile != "":
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if cfg.logTruncate {
			flags |= os.O_TRUNC
		}
		f, err := os.OpenFile(cfg.logFile, flags, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("--log: %w", err)
		}
		w, closer, level = f, func() { f.Close() }, slog.LevelInfo
	case cfg.logFD >= 0:
		w, level = os.NewFile(uintptr(cfg.logFD), "log"), slog.LevelInfo
	}
	switch {
	case cfg.logLevel >= 3:
		level = slog.LevelDebug
	case cfg.logLevel >= 1:
		level = slog.LevelInfo
	case cfg.logLevel == 0:
		level = slog.LevelError
	}
	if cfg.logPrefix != "" {
		w = &prefixWriter{prefix: []byte(cfg.logPrefix), w: w}
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})), closer, nil
}

// prefixWriter puts swtpm's --log prefix in front of every record.
type prefixWriter struct {
	prefix []byte
	w      io.Writer
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	if _, err := p.w.Write(append(append([]byte{}, p.prefix...), b...)); err != nil {
		return 0, err
	}
	return len(b), nil
}

// listen opens the listener of an endpoint (a given fd may be a listening
// socket or, for a data channel, an already connected one).
func listen(opt string, e *endpoint) (net.Listener, net.Conn, error) {
	if e.fd >= 0 || e.clientfd >= 0 {
		fd := max(e.fd, e.clientfd)
		f := os.NewFile(uintptr(fd), opt)
		defer f.Close()
		if e.clientfd < 0 {
			if v, err := syscall.GetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN); err == nil && v == 1 {
				ln, err := net.FileListener(f)
				if err != nil {
					return nil, nil, fmt.Errorf("%s: fd=%d: %w", opt, fd, err)
				}
				return ln, nil, nil
			}
		}
		c, err := net.FileConn(f)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: fd=%d is not a socket: %w", opt, fd, err)
		}
		return nil, c, nil
	}
	if e.typ == "tcp" {
		ln, err := net.Listen("tcp", net.JoinHostPort(e.bindaddr, strconv.Itoa(e.port)))
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", opt, err)
		}
		return ln, nil, nil
	}
	if fi, err := os.Lstat(e.path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		// A stale socket of an earlier run is removed, as swtpm does; one
		// that a running server accepts on is not (a second start, say
		// an incoming migration's, on a live instance's paths).
		if c, err := net.DialTimeout("unix", e.path, time.Second); err == nil {
			c.Close()
			return nil, nil, fmt.Errorf("%s: %s: a running server listens on it", opt, e.path)
		}
		os.Remove(e.path)
	}
	ln, err := net.Listen("unix", e.path)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", opt, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	if e.mode != 0 {
		if err := os.Chmod(e.path, e.mode); err != nil {
			ln.Close()
			return nil, nil, fmt.Errorf("%s: mode: %w", opt, err)
		}
	}
	if e.uid >= 0 || e.gid >= 0 {
		if err := os.Chown(e.path, e.uid, e.gid); err != nil {
			ln.Close()
			return nil, nil, fmt.Errorf("%s: uid/gid: %w", opt, err)
		}
	}
	return ln, nil, nil
}

// tpm2Startup builds TPM2_Startup(su).
func tpm2Startup(su uint16) []byte {
	return []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, byte(su >> 8), byte(su)}
}

func serveSocket(ctx context.Context, cfg *socketConfig) (err error) {
	if err := refuseNewInRoot(cfg); err != nil {
		return err
	}
	log, closeLog, err := newLogger(cfg)
	if err != nil {
		return err
	}
	defer closeLog()

	if confine.DropInStateDirMissing() {
		return fmt.Errorf("--tpmstate: %s does not exist: create it first, as swtpm needs (with --runas the drop-in does not create it as root, and its writes are confined to that directory before it becomes the user)", cfg.stateDir)
	}
	if err := os.MkdirAll(cfg.stateDir, 0o750); err != nil {
		return fmt.Errorf("--tpmstate: %w", err)
	}

	// The directory's lock first: a second start on a running instance
	// must fail before it touches that instance's sockets (listen removes
	// a socket file at its path).
	var held *dirlock.Lock
	if cfg.stateLock && !cfg.migrationIncoming {
		l, err := statestore.LockDir(cfg.stateDir)
		if err != nil {
			return fmt.Errorf("--tpmstate: %w", err)
		}
		held = l
		defer func() { held.Release() }() // until openState takes it
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Listen, then read the state and initialise the TPM, then serve, as
	// swtpm does: the sockets exist early (libvirt and QEMU wait for
	// them) and early clients wait in the backlog.
	var srv *swtpmproto.Server // set once the state is read, before any server starts
	errc := make(chan error, 8)
	var running int
	var servers []func() error
	start := func(f func() error) { servers = append(servers, f) }
	var opened []io.Closer // closed here if serving never starts
	defer func() {
		if running == 0 {
			for _, c := range opened {
				c.Close()
			}
		}
	}()
	if cfg.ctrl != nil {
		ln, conn, err := listen("--ctrl", cfg.ctrl)
		if err != nil {
			return err
		}
		opened = append(opened, closerOf(ln, conn))
		if ln != nil {
			start(func() error { return srv.ServeControl(ctx, ln) })
		} else {
			start(func() error {
				defer context.AfterFunc(ctx, func() { conn.Close() })()
				defer conn.Close()
				srv.HandleControl(ctx, conn)
				return nil
			})
		}
	}
	if cfg.server != nil {
		ln, conn, err := listen("--server", cfg.server)
		if err != nil {
			return err
		}
		if ln != nil {
			// Out of the netpoller: the engine accepts on it in C.
			unlink := ""
			if cfg.server.fd < 0 && cfg.server.typ != "tcp" {
				unlink = cfg.server.path
			}
			ul, err := swtpmproto.Unpolled(ln, unlink)
			if err != nil {
				ln.Close()
				return fmt.Errorf("--server: %w", err)
			}
			ln = ul
		}
		opened = append(opened, closerOf(ln, conn))
		if ln != nil {
			start(func() error { return srv.ServeData(ctx, ln, cfg.server.disconnect) })
		} else {
			start(func() error {
				defer context.AfterFunc(ctx, func() { conn.Close() })()
				defer conn.Close()
				srv.HandleDataConn(ctx, conn)
				return nil
			})
		}
	}
	if cfg.mssimPort >= 0 {
		cmdLn, err := net.Listen("tcp", net.JoinHostPort(cfg.mssimBind, strconv.Itoa(cfg.mssimPort)))
		if err != nil {
			return fmt.Errorf("--mssim: %w", err)
		}
		opened = append(opened, cmdLn)
		platLn, err := net.Listen("tcp", net.JoinHostPort(cfg.mssimBind, strconv.Itoa(cfg.mssimPort+1)))
		if err != nil {
			return fmt.Errorf("--mssim: platform port: %w", err)
		}
		opened = append(opened, platLn)
		start(func() error { return srv.ServeMssimCommand(ctx, cmdLn) })
		start(func() error { return srv.ServeMssimPlatform(ctx, platLn) })
	}
	// From here on the process reads state files and, once it serves,
	// commands a guest sends (libtpms parses both): it keeps only the
	// system calls that takes.
	if err := confineDropIn(cfg, log); err != nil {
		return err
	}
	store, sealer, err := openState(cfg, log, held)
	held = nil // the store's now, or released
	if err != nil {
		return err
	}
	defer store.Close()

	tpm, err := engine.New(store, log)
	if err != nil {
		return err
	}
	defer tpm.Close()

	var served swtpmproto.TPM = tpm
	if cfg.migrationIncoming || cfg.releaseLockOutgoing {
		served = &migrationLocking{TPM: tpm, store: store, incoming: cfg.migrationIncoming && cfg.stateLock,
			releaseOutgoing: cfg.releaseLockOutgoing, log: log}
	}
	opts := swtpmproto.Options{
		Logger:                log,
		FileKey:               cfg.key != nil,
		MigrationKey:          sealer != nil,
		RejectLocality4:       cfg.rejectLocality4,
		TerminateOnDisconnect: cfg.terminate,
		LockStorage:           storageLocker(store, cfg.stateLock && !cfg.migrationIncoming),
	}
	if sealer != nil {
		opts.Migration = sealer
	}
	srv = swtpmproto.New(served, opts)

	if len(servers) == 0 {
		return errors.New("nothing to serve: give --ctrl, --server or --mssim")
	}
	if cfg.notNeedInit {
		// Through served: an incoming instance takes the directory's lock
		// first, as CMD_INIT would have it do.
		if rc := served.Init(0); rc != 0 {
			return fmt.Errorf("--flags not-need-init: initializing the TPM failed: TPM result 0x%x", rc)
		}
		var su uint16 = 0xffff
		switch cfg.startup {
		case "clear":
			su = 0
		case "state":
			su = 1
		}
		if su != 0xffff {
			resp := tpm.Execute(nil, tpm2Startup(su))
			if len(resp) >= 10 {
				if rc := uint32(resp[6])<<24 | uint32(resp[7])<<16 | uint32(resp[8])<<8 | uint32(resp[9]); rc != 0 {
					log.Warn("TPM2_Startup failed", "type", cfg.startup, "rc", fmt.Sprintf("0x%x", rc))
				}
			}
		}
	}

	for _, f := range servers {
		running++
		go func() { errc <- f() }()
	}

	if cfg.pidFile != "" {
		if err := writePidFile(cfg.pidFile); err != nil {
			return fmt.Errorf("--pid: %w", err)
		}
		defer os.Remove(cfg.pidFile)
	} else if cfg.pidFD >= 0 {
		f := os.NewFile(uintptr(cfg.pidFD), "pidfd")
		_, err := fmt.Fprintf(f, "%d", os.Getpid())
		f.Close()
		if err != nil {
			return fmt.Errorf("--pid: fd=%d: %w", cfg.pidFD, err)
		}
	}
	if fd := os.Getenv(daemonReadyEnv); fd != "" {
		os.Unsetenv(daemonReadyEnv)
		if n, err := strconv.Atoi(fd); err == nil {
			f := os.NewFile(uintptr(n), "ready")
			f.Write([]byte{1})
			f.Close()
		}
		// Detach stderr now that start-up errors can no longer happen.
		if devnull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0); err == nil {
			syscall.Dup2(int(devnull.Fd()), 2)
			devnull.Close()
		}
	}
	log.Info("cvtpm socket ready", "statedir", cfg.stateDir)

	var runErr error
	select {
	case <-ctx.Done():
	case <-srv.ShutdownRequested():
		log.Info("CMD_SHUTDOWN received; terminating")
	case runErr = <-errc:
		running--
	}
	// Close the listeners (which unlinks unix sockets) and wait for every
	// connection to end before the engine and the store go away.
	cancel()
	srv.CloseDataFD()
	for ; running > 0; running-- {
		if err := <-errc; err != nil && runErr == nil {
			runErr = err
		}
	}
	srv.Wait()
	tpm.Stop()
	return runErr
}

// confineDropIn closes the descriptors the process inherited and no
// option names, checks what the constructor did about writes beneath
// /proc and /sys, makes the process non-dumpable and installs the
// drop-in's seccomp filter as --seccomp says.
func confineDropIn(cfg *socketConfig, log *slog.Logger) error {
	if cfg.confine == nil {
		return nil
	}
	if err := closeInherited(cfg, log); err != nil {
		return err
	}
	// Done before Go started (internal/confine, early_linux.go): no file
	// beneath /proc or /sys opens for writing, so no /proc/self/mem to
	// write code through past the filter's refusal of executable memory.
	switch ok, err := confine.DropInLandlock(); {
	case errors.Is(err, confine.ErrNoLandlock):
		log.Error("no Landlock for this process (an old kernel, or a container that refuses it); serving with files beneath /proc and /sys writable (/proc/self/mem among them)", "err", err)
	case err != nil:
		return err
	case !ok && cfg.seccomp != "none":
		log.Error("files beneath /proc and /sys were not confined at start (the command line did not begin with \"socket\"); serving without")
	case ok:
		mountinfo, _ := os.ReadFile("/proc/self/mountinfo")
		for _, at := range procfsElsewhere(string(mountinfo)) {
			log.Error("a procfs is mounted outside /proc; writes beneath it (its self/mem among them) are not refused", "at", at)
		}
	}
	// Non-dumpable first, whatever --seccomp says: processes of the same
	// user (another guest's drop-in, taken over) can then neither read nor
	// write its memory through /proc/PID/mem nor reopen its descriptors.
	if err := confine.NotDumpable(); err != nil {
		return fmt.Errorf("making the process non-dumpable: %w", err)
	}
	if cfg.seccomp == "none" {
		return nil
	}
	err := cfg.confine(confine.Mode(cfg.seccomp))
	if errors.Is(err, confine.ErrUnsupported) {
		log.Error("no seccomp filter on this platform (there is one for linux/amd64 only); serving without", "seccomp", cfg.seccomp)
		return nil
	}
	if err != nil {
		return fmt.Errorf("--seccomp action=%s: %w", cfg.seccomp, err)
	}
	return nil
}

// refuseNewInRoot refuses a state directory, pid file or log file that
// the drop-in would create directly in / while Landlock confines its
// writes (internal/confine, DropInLandlock): they are allowed only
// beneath the entries / had when the process started, so such a path
// would fail later with a bare "permission denied".
func refuseNewInRoot(cfg *socketConfig) error {
	if cfg.confine == nil {
		return nil
	}
	if ok, err := confine.DropInLandlock(); !ok || err != nil {
		return nil
	}
	for _, p := range []struct{ opt, path string }{{"--tpmstate dir", cfg.stateDir}, {"--pid file", cfg.pidFile}, {"--log file", cfg.logFile}} {
		if p.path == "" {
			continue
		}
		abs, err := filepath.Abs(p.path)
		if err != nil || filepath.Dir(abs) != "/" {
			continue
		}
		if _, err := os.Lstat(abs); errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s=%s: cannot be created directly in / (the drop-in opens files for writing only beneath entries / had at its start, which keeps /proc and /sys out of reach); create it first or choose a path in a directory", p.opt, p.path)
		}
	}
	return nil
}

// procfsElsewhere lists, from /proc/self/mountinfo's text, the mount
// points of procfs instances other than /proc (a chroot's, say), where
// Landlock's rule over /'s entries lets writes through.
func procfsElsewhere(mountinfo string) []string {
	var out []string
	for _, line := range strings.Split(mountinfo, "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && len(g) >= 1 && g[0] == "proc" && f[4] != "/proc" {
			out = append(out, f[4])
		}
	}
	return out
}

// closeInherited closes every descriptor above stderr that the process
// had when it was executed, that no option names (fd=, clientfd=,
// pwdfd=, --pid fd=, --log fd=, --fd, --daemon's readiness pipe) and
// that holds no lock: what a parent left open without close-on-exec (a
// directory, a socket, another instance's state file) would otherwise
// stay in reach of code a guest ran in this process through a libtpms
// bug, past the seccomp filter, which allows reading and writing any
// descriptor. A shell or a service manager may leave such descriptors;
// libvirt passes one, its locked pid file, which is kept. swtpm keeps
// them all.
func closeInherited(cfg *socketConfig, log *slog.Logger) error {
	fds, ok, err := confine.DropInInherited()
	if err != nil {
		return fmt.Errorf("closing inherited descriptors: %w", err)
	}
	if !ok {
		log.Warn("the descriptors this process inherited were not recorded at its start (is /proc mounted?); any it was not told to use stay open")
		return nil
	}
	named := cfg.namedDescriptors()
	var closed, locked []int
	for _, fd := range fds {
		switch {
		case slices.Contains(named, fd):
		case holdsLock(fd):
			// Closing it would drop the lock, which is the parent's way to
			// know this process runs: libvirt passes its pid file locked
			// and reads the pid only while the lock is held.
			locked = append(locked, fd)
		default:
			syscall.Close(fd)
			closed = append(closed, fd)
		}
	}
	if len(closed) > 0 {
		log.Info("closed inherited descriptors that no option names", "fds", closed)
	}
	if len(locked) > 0 {
		log.Info("kept inherited descriptors that hold a lock (a pid file's, as libvirt passes it)", "fds", locked)
	}
	return nil
}

// holdsLock says whether the process holds a lock (POSIX, OFD or flock)
// through descriptor fd: /proc/self/fdinfo lists them as "lock:" lines.
func holdsLock(fd int) bool {
	b, err := os.ReadFile("/proc/self/fdinfo/" + strconv.Itoa(fd))
	return err == nil && (strings.HasPrefix(string(b), "lock:") || strings.Contains(string(b), "\nlock:"))
}

// namedDescriptors is every descriptor the options (and --daemon's
// environment) tell the process to use.
func (c *socketConfig) namedDescriptors() []int {
	named := []int{c.pidFD, c.logFD}
	for _, e := range []*endpoint{c.server, c.ctrl} {
		if e != nil {
			named = append(named, e.fd, e.clientfd)
		}
	}
	for _, k := range []*keySpec{c.key, c.migrationKey} {
		if k != nil {
			named = append(named, k.fd, k.pwdfd)
		}
	}
	if n, err := strconv.Atoi(os.Getenv(daemonReadyEnv)); err == nil {
		named = append(named, n)
	}
	return named
}

// migrationLocking is the TPM as --migration has it lock its storage: an
// incoming instance takes the directory lock when its state arrives or it
// is initialised (retrying while the source releases it), an outgoing one
// releases it once the savestate blob, the last QEMU reads, has been read.
//
// Commands need no locking of their own, so the engine's C loops serve
// them through it (ServeStream, ServeListener).
type migrationLocking struct {
	*engine.TPM
	store           stateStore
	incoming        bool
	releaseOutgoing bool
	log             *slog.Logger
	mu              sync.Mutex
	locked          bool
}

func (m *migrationLocking) lock() uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.incoming || m.locked {
		return 0
	}
	if err := storageLocker(m.store, false)(300); err != nil { // 3 s, as swtpm's default retries
		m.log.Error("incoming migration: the state directory stays locked by another process", "err", err)
		return 0x101 // TPM_RC_FAILURE
	}
	m.locked = true
	return 0
}

func (m *migrationLocking) Init(flags uint32) uint32 {
	if rc := m.lock(); rc != 0 {
		return rc
	}
	return m.TPM.Init(flags)
}

func (m *migrationLocking) SetState(blobType uint32, blob []byte) uint32 {
	if rc := m.lock(); rc != 0 {
		return rc
	}
	return m.TPM.SetState(blobType, blob)
}

func (m *migrationLocking) GetState(blobType uint32) ([]byte, uint32) {
	b, rc := m.TPM.GetState(blobType)
	// Asked for, not necessarily there: the savestate blob exists only
	// after TPM2_Shutdown(STATE), but QEMU asks for it last either way.
	if blobType == 3 && m.releaseOutgoing { // PTM_BLOB_TYPE_SAVESTATE
		if u, ok := m.store.(interface{ Unlock() error }); ok {
			if err := u.Unlock(); err != nil {
				m.log.Error("outgoing migration: releasing the state directory lock", "err", err)
			} else {
				m.log.Info("outgoing migration: state directory lock released")
			}
		}
	}
	return b, rc
}

// migrationLocking must hand the engine's C loops on: it is a
// swtpmproto.TPM like the engine, and serving its commands in Go would
// only be slower.
var (
	_ swtpmproto.Streamer       = (*migrationLocking)(nil)
	_ swtpmproto.ListenerServer = (*migrationLocking)(nil)
)

// closerOf returns whichever of ln and c listen returned.
func closerOf(ln net.Listener, c net.Conn) io.Closer {
	if ln != nil {
		return ln
	}
	return c
}

// storageLocker serves CMD_LOCK_STORAGE as swtpm 0.8 does: locking an
// already locked store succeeds; otherwise it is tried retries more times,
// 10 ms apart (another process may be releasing it during a migration).
func storageLocker(store stateStore, locked bool) func(retries uint32) error {
	var mu sync.Mutex
	return func(retries uint32) error {
		mu.Lock()
		defer mu.Unlock()
		for i := uint32(0); !locked; i++ {
			err := store.Lock()
			if err == nil {
				locked = true
				break
			}
			if i >= retries {
				return err
			}
			time.Sleep(10 * time.Millisecond)
		}
		return nil
	}
}

// writePidFile writes the PID into path in place, as swtpm does:
// swtpm_setup creates the file and waits on its own descriptor of it, so
// the file must not be replaced by another one.
func writePidFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := fmt.Fprintf(f, "%d", os.Getpid()); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
