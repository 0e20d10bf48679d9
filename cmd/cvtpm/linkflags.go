package main

// Flags shared by the attested link's clients (frontend, guest proxy).

import (
	"errors"
	"flag"

	"cvtpm/internal/attestedlink"
)

type linkFlags struct{ cert, key, policy *string }

func addLinkFlags(fs *flag.FlagSet) linkFlags {
	return linkFlags{
		cert:   fs.String("cert", "", "this client's link certificate (PEM, e.g. from 'cvtpm ca identity') (required)"),
		key:    fs.String("key", "", "its private key (PEM) (required)"),
		policy: fs.String("policy", "", "evidence policy the backend must meet (JSON: trusted roots, approved measurements, ...; see csv.AppraisalPolicy) (required)"),
	}
}

func (l linkFlags) load() (attestedlink.ClientConfig, error) {
	if *l.cert == "" || *l.key == "" || *l.policy == "" {
		return attestedlink.ClientConfig{}, errors.New("--cert, --key and --policy are required (see --help)")
	}
	return attestedlink.LoadClientConfig(*l.cert, *l.key, *l.policy)
}
