package main

// Flags shared by the attested link's clients (frontend, guest proxy).

import (
	"flag"
	"fmt"
	"os"
	"slices"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
	"cvtpm/internal/cliconf"
	"cvtpm/internal/gcm"
)

type linkFlags struct {
	cert, key, policy, certDir, kds *string
	evidenceCerts                   *bool
	names                           []string // as registered, aliases included
}

func addLinkFlags(fs *flag.FlagSet) linkFlags {
	before := map[string]bool{}
	fs.VisitAll(func(f *flag.Flag) { before[f.Name] = true })
	l := linkFlags{
		cert:          fs.String("tls-cert", "", "this client's link certificate (PEM, e.g. from 'cvtpm ca identity') (required)"),
		key:           fs.String("tls-key", "", "its private key (PEM) (required)"),
		policy:        fs.String("policy", "", "evidence policy the backend must meet (JSON: trusted roots, approved measurements, ...; see csv.AppraisalPolicy) (required)"),
		certDir:       fs.String("cert-dir", "", "look the backend chip's HSK+CEK up by its serial in this offline directory (hsk_cek/<serial>/hsk_cek.cert)"),
		kds:           fs.String("kds", "", "look the backend chip's HSK+CEK up by its serial at this HYGON KDS (default "+csv.DefaultKDS+" unless --cert-dir or --evidence-certs)"),
		evidenceCerts: fs.Bool("evidence-certs", false, "use the HSK+CEK the backend sends (the chip serial is then the backend's own claim: the policy's chip allow/deny lists are refused)"),
	}
	cliconf.Alias(fs, "tls-cert", "cert")
	cliconf.Alias(fs, "tls-key", "key")
	fs.VisitAll(func(f *flag.Flag) {
		if !before[f.Name] {
			l.names = append(l.names, f.Name)
		}
	})
	return l
}

// given returns the name of a link flag set on fs's command line (or in
// its configuration file), or "".
func (l linkFlags) given(fs *flag.FlagSet) string {
	name := ""
	fs.Visit(func(f *flag.Flag) {
		if slices.Contains(l.names, f.Name) {
			name = f.Name
		}
	})
	return name
}

func (l linkFlags) load() (attestedlink.ClientConfig, error) {
	if *l.cert == "" || *l.key == "" || *l.policy == "" {
		return attestedlink.ClientConfig{}, usageError("--tls-cert, --tls-key and --policy are required (see --help)")
	}
	for _, f := range []struct{ flag, path string }{{"--tls-cert", *l.cert}, {"--tls-key", *l.key}} {
		if _, err := os.ReadFile(f.path); err != nil {
			return attestedlink.ClientConfig{}, flagError(f.flag, err)
		}
	}
	if _, err := csv.LoadAppraisalPolicy(*l.policy); err != nil {
		return attestedlink.ClientConfig{}, flagError("--policy", err)
	}
	cfg, err := attestedlink.LoadClientConfig(*l.cert, *l.key, *l.policy)
	if err != nil {
		return cfg, flagError("--tls-cert, --tls-key", err)
	}
	// nil (the backend's own pair) only with --evidence-certs.
	if cfg.Certs, err = csv.SelectCertSource(*l.certDir, *l.kds, *l.evidenceCerts, cfg.Policy); err != nil {
		return cfg, fmt.Errorf("the backend chip's HSK+CEK (--cert-dir, --kds, --evidence-certs): %w", err)
	}
	return cfg, nil
}

// directCipher is the value of a --direct flag: the cipher of the session
// handed to the instance's worker, or "" for "off" (everything through
// the backend's supervisor).
func directCipher(v string) (string, error) {
	switch v {
	case "off":
		return "", nil
	case gcm.AES256, gcm.SM4:
		return v, nil
	}
	return "", flagError("--direct", fmt.Errorf("%q: want %s, %s or off", v, gcm.AES256, gcm.SM4))
}
