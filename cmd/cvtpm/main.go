// Command cvtpm is the confidential vTPM: one binary whose subcommands run the
// swtpm-compatible TPM socket, the backend, the host frontend, the EK CA, the
// verifier and the in-guest tools.
//
// Invoked under the name "swtpm" (for example through a symlink that libvirt
// finds on its PATH) it behaves exactly as "cvtpm", so "swtpm socket --tpm2 ..."
// runs cvtpm's socket command.
package main

import (
	"context"
	"cvtpm/internal/cliconf"
	"cvtpm/internal/version"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// command is one subcommand of cvtpm. Each lives in its own file and
// registers itself in init, so adding a command touches no shared code.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string) error
}

var commands = map[string]command{}

func register(c command) {
	if _, dup := commands[c.name]; dup {
		panic("cvtpm: duplicate command " + c.name)
	}
	commands[c.name] = c
}

// exitError carries a process exit code through the command's error return
// without printing anything more (the command already explained itself).
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// usageError is a command line that cannot run as given (a required flag
// missing, flags that exclude each other): one line, exit status 2.
type usageError string

func (e usageError) Error() string { return string(e) }

func usage() {
	fmt.Fprintf(os.Stderr, "Usage: cvtpm <command> [options]\n\nCommands:\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(os.Stderr, "  %-10s %s\n", n, commands[n].summary)
	}
	fmt.Fprintf(os.Stderr, "  %-10s %s\n", "version", "print cvtpm's version and commit (also --version)")
	fmt.Fprintf(os.Stderr, "\nRun 'cvtpm <command> --help' for the options of a command.\n"+
		"Invoked as 'swtpm' (a symlink), cvtpm accepts swtpm's command line.\n")
}

func main() {
	args := os.Args[1:]
	prog := filepath.Base(os.Args[0])
	_ = prog // "swtpm" and "cvtpm" behave the same: the subcommand comes first.

	if len(args) == 0 {
		usage()
		os.Exit(2)
	}
	switch args[0] {
	case "-h", "--help", "help":
		usage()
		return
	case "--version", "version":
		fmt.Println(version.String("cvtpm"))
		return
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "cvtpm: unknown command %q (run 'cvtpm --help' for the list)\n", args[0])
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := cmd.run(ctx, args[1:])
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		fmt.Fprintf(os.Stderr, "cvtpm %s: %s\n", cmd.name, plainError(err))
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// plainError is err as one line a person reads: a gRPC status inside it
// loses the "rpc error: code = ... desc = connection error: desc =
// "transport: ..."" layers and says what the code means.
func plainError(err error) string {
	msg := err.Error()
	var se interface{ GRPCStatus() *status.Status }
	i := strings.Index(msg, "rpc error: ")
	if !errors.As(err, &se) || i < 0 {
		return msg
	}
	st := se.GRPCStatus()
	desc := st.Message()
	if st.Code() == codes.Unavailable {
		desc = strings.TrimPrefix(desc, "connection error: desc = ")
		desc = strings.Trim(desc, `"`)
		desc = strings.TrimPrefix(desc, "transport: ")
		desc = strings.TrimPrefix(desc, "Error while dialing: ")
		return msg[:i] + "unreachable (" + desc + "): is the service running at that address?"
	}
	what, ok := codeWords[st.Code()]
	if !ok {
		what = strings.ToLower(st.Code().String())
	}
	return msg[:i] + desc + " (" + what + ")"
}

// codeWords says what a gRPC status code means to the person who ran the
// command.
var codeWords = map[codes.Code]string{
	codes.PermissionDenied:   "refused",
	codes.FailedPrecondition: "refused",
	codes.Unauthenticated:    "not authenticated",
	codes.InvalidArgument:    "rejected as invalid",
	codes.NotFound:           "not found",
	codes.AlreadyExists:      "already exists",
	codes.ResourceExhausted:  "busy: try again later",
	codes.DeadlineExceeded:   "timed out",
	codes.Internal:           "the service failed",
}

// parseFlags parses args and turns --help into a clean exit; --version
// prints cvtpm's version on every command. Positional arguments are
// refused (parseFlagsArgs takes them).
func parseFlags(fs *flag.FlagSet, args []string) (done bool, err error) {
	if done, err := parseFlagsArgs(fs, args); done {
		return done, err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return true, exitError{2}
	}
	return false, nil
}

// parseFlagsArgs is parseFlags for commands with positional arguments.
func parseFlagsArgs(fs *flag.FlagSet, args []string) (done bool, err error) {
	if len(args) == 1 && (args[0] == "--version" || args[0] == "-version") {
		fmt.Println(version.String("cvtpm"))
		return true, nil
	}
	if err := cliconf.Parse(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return true, nil
		}
		return true, usageError(err.Error())
	}
	return false, nil
}
