// Package frontend is the host-side face of cvtpm: per VM it serves QEMU's
// tpm-emulator (swtpm) protocol and forwards commands to a backend instance
// over the attested link, and it relays guestkit connections as opaque bytes
// (each pair copied by a thread of its own, internal/pump).
package frontend
