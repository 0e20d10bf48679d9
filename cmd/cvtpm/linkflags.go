package main

// Flags shared by the attested link's clients (frontend, guest proxy).

import (
	"errors"
	"flag"
	"time"

	"cvtpm/attest/csv"
	"cvtpm/internal/attestedlink"
)

type linkFlags struct{ cert, key, policy, kds *string }

func addLinkFlags(fs *flag.FlagSet) linkFlags {
	return linkFlags{
		cert:   fs.String("cert", "", "this client's link certificate (PEM, e.g. from 'cvtpm ca identity') (required)"),
		key:    fs.String("key", "", "its private key (PEM) (required)"),
		policy: fs.String("policy", "", "evidence policy the backend must meet (JSON: trusted roots, approved measurements, ...; see csv.AppraisalPolicy) (required)"),
		kds:    fs.String("kds", "", "fetch the backend chip's HSK+CEK from this HYGON KDS base URL instead of trusting the pair the backend sends (either way it must chain to a trusted root)"),
	}
}

func (l linkFlags) load() (attestedlink.ClientConfig, error) {
	if *l.cert == "" || *l.key == "" || *l.policy == "" {
		return attestedlink.ClientConfig{}, errors.New("--cert, --key and --policy are required (see --help)")
	}
	cfg, err := attestedlink.LoadClientConfig(*l.cert, *l.key, *l.policy)
	if err == nil && *l.kds != "" {
		cfg.Certs = &csv.CachedSource{Source: csv.HTTPSource{BaseURL: *l.kds}, TTL: 24 * time.Hour}
	}
	return cfg, err
}
