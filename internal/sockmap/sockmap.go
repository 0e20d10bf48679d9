// Package sockmap joins two TCP connections in the kernel, so that a relay
// forwards bytes without being woken for them: both sockets go into a BPF
// sockhash whose SK_SKB verdict program redirects what one socket receives
// to the other's send queue. On the attested path the host's relay
// (frontend.Relay) is one process wake-up in each direction of every TPM
// command; joined, the kernel forwards the ciphertext itself.
//
// It needs CAP_BPF and CAP_NET_ADMIN (root) and a kernel with
// CONFIG_BPF_STREAM_PARSER (sockmap); New says why when it cannot, and the
// relay then copies as before. What the host can do with it: nothing new:
// it relays ciphertext either way, and the relay is the host's own.
package sockmap

import "errors"

// ErrUnsupported is returned by Join when the connections cannot be
// joined (not both TCP sockets, say); nothing was read from either, and
// the caller copies instead.
var ErrUnsupported = errors.New("sockmap: connections cannot be joined in the kernel")
