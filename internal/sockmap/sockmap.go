// Package sockmap joins two TCP connections in the kernel, so that a relay
// forwards bytes without being woken for them: both sockets go into a BPF
// sockhash whose SK_SKB verdict program redirects what one socket receives
// to the other's send queue. On the attested path the host's relay
// (frontend.Relay) is one wake-up in each direction of every TPM command;
// joined, the kernel forwards the ciphertext itself. Since the relay copies
// on a C thread of its own (internal/pump, which keeps the backpressure
// this gives up), joining measured no faster (2026-12-03).
//
// It needs CAP_BPF and CAP_NET_ADMIN (root) and a kernel with
// CONFIG_BPF_STREAM_PARSER (sockmap); New says why when it cannot. What
// the host can do with it: nothing new: it relays ciphertext either way,
// and the relay is the host's own.
//
// The price, and why a relay joins only when its operator says so
// (`cvtpm frontend --relay-join on`): a joined pair loses TCP's
// backpressure. The kernel moves what one side receives onto a queue for
// the other side's sending, and that queue has no bound: with a backend
// that never read, a guest wrote 256 MiB through a joined pair in 0.6 s
// and the host's kernel held about 180 MB for it (measured on Linux 6.18,
// 2026-12-02). A guest that sends without reading can make the host's
// kernel queue memory until the connection ends. Bytes a side sends after
// the other side half-closed its sending may also be lost; the attested
// link never does that.
package sockmap

import "errors"

// ErrUnsupported is returned by Join when the connections cannot be
// joined (not both TCP sockets, say); nothing was read from either, and
// the caller copies instead.
var ErrUnsupported = errors.New("sockmap: connections cannot be joined in the kernel")
