// The accept loop of a data listener, in C: swtpmproto/inline.go's inline
// phase (that file explains the policy) without the Go scheduler between
// a connection's arrival and its answer. accept.go says why.
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include "stream.h"
#include "_cgo_export.h"

#define INLINE_BUDGET_NS 2000000 // inline.go's inlineBudget

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// peer_closed reports whether fd's next read is the end of the stream.
static int peer_closed(int fd)
{
    char b;
    return recv(fd, &b, 1, MSG_DONTWAIT | MSG_PEEK) == 0;
}

static int listener_waiting(int lfd)
{
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    struct timespec zero = {0, 0};
    return ppoll(&p, 1, &zero, NULL) > 0;
}

// An inline read, as inline.go's inlineReader.
struct inline_reader {
    int fd, lfd;
    int64_t deadline;
    int poll_first; // the next read waits first
    int reads;      // reads that returned bytes
};

#define HANDOFF 1

// wait_inline returns 0 once fd is readable (or hung up), HANDOFF when the
// deadline passes or a connection waits on lfd, or -errno.
static int wait_inline(struct inline_reader *r)
{
    for (;;) {
        int64_t left = r->deadline - now_ns();
        if (left <= 0)
            return HANDOFF;
        struct pollfd p[2] = {{.fd = r->fd, .events = POLLIN}, {.fd = r->lfd, .events = POLLIN}};
        struct timespec ts = {left / 1000000000, left % 1000000000};
        int n = ppoll(p, 2, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return HANDOFF;
        if (p[1].revents) { // another connection waits
            if (p[0].revents && peer_closed(r->fd))
                return 0; // let the read see the end: closing here is cheaper
            return HANDOFF;
        }
        return 0;
    }
}

// read_inline reads into b without blocking, waiting in ppoll until the
// deadline: it returns 0 with *got set (0 at the end of the stream),
// HANDOFF, or -errno.
static int read_inline(struct inline_reader *r, unsigned char *b, uint32_t n, uint32_t *got)
{
    // A command that needs more than one read is arriving in pieces: it
    // goes on elsewhere as soon as another connection waits.
    if (r->reads > 0 && listener_waiting(r->lfd) && !peer_closed(r->fd))
        return HANDOFF;
    for (;;) {
        if (r->poll_first) {
            r->poll_first = 0;
            int err = wait_inline(r);
            if (err)
                return err;
        }
        if (now_ns() >= r->deadline)
            return HANDOFF; // a client trickling its bytes
        ssize_t m = recv(r->fd, b, n, MSG_DONTWAIT);
        if (m >= 0) {
            if (m > 0)
                r->reads++;
            *got = (uint32_t)m;
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            r->poll_first = 1;
            continue;
        }
        return -errno;
    }
}

// hand_off ends the inline phase: fd, with its first pending bytes in the
// caller's buffer, goes on elsewhere.
static int hand_off(struct cvtpm_accept_result *res, int fd, uint32_t pending, int idle)
{
    res->fd = fd;
    res->pending = pending;
    res->idle = idle;
    return CVTPM_ACCEPT_HANDOFF;
}

// conn_failed closes fd, which failed with errno err.
static int conn_failed(struct cvtpm_accept_result *res, int fd, int err)
{
    close(fd);
    res->err = err;
    return CVTPM_ACCEPT_CONN_ERR;
}

// serve_first answers fd's first command and waits (bounded) for the
// client to close. It returns CVTPM_ACCEPT_NEXT when fd is done with
// (closed), or a status for the caller with res filled and fd open
// (HANDOFF) or closed (the others).
static int serve_first(int fd, int lfd, uint32_t maxcmd, int reject_loc4, int once, const int32_t *stop,
                       unsigned char *buf, uint32_t bufcap, unsigned char **out, uint32_t *outcap,
                       struct cvtpm_accept_result *res)
{
    struct inline_reader r = {.fd = fd, .lfd = lfd, .deadline = now_ns() + INLINE_BUDGET_NS};
    struct cvtpm_frame f;
    uint32_t len = 0, need, got, rc;
    int err;

    while ((need = cvtpm_parse_frame(buf, len, maxcmd, &f)) > len) {
        err = read_inline(&r, buf + len, bufcap - len, &got);
        if (err == HANDOFF)
            return hand_off(res, fd, len, len == 0);
        if (err < 0)
            return conn_failed(res, fd, -err);
        if (got == 0) {
            close(fd);
            return len > 0 ? CVTPM_ACCEPT_TRUNCATED : CVTPM_ACCEPT_NEXT;
        }
        len += got;
    }
    if (need == 0) {
        res->header_len = len < CVTPM_PREFIX_LEN ? len : CVTPM_PREFIX_LEN;
        memcpy(res->header, buf, res->header_len);
        close(fd);
        return CVTPM_ACCEPT_BAD_FRAME;
    }
    if (__atomic_load_n(stop, __ATOMIC_ACQUIRE)) { // stopped while the command arrived
        close(fd);
        return CVTPM_ACCEPT_STOPPED;
    }
    uint32_t n = cvtpm_answer(buf, &f, reject_loc4, out, outcap, &rc);
    if (rc != 0)
        cvtpmGoProcessFailed(rc);
    if ((err = cvtpm_write_all(fd, *out, n)) != 0)
        return conn_failed(res, fd, -err);
    len -= f.end;
    memmove(buf, buf + f.end, len);
    if (once) {
        close(fd);
        return CVTPM_ACCEPT_NEXT;
    }
    if (len > 0) // pipelined
        return hand_off(res, fd, len, 0);
    // A connection-per-command client closes now: wait (bounded) for it.
    // It has not closed yet (it is reading the answer), so poll first.
    r.deadline = now_ns() + INLINE_BUDGET_NS;
    r.poll_first = 1;
    r.reads = 0;
    err = read_inline(&r, buf, bufcap, &got);
    if (err == HANDOFF)
        return hand_off(res, fd, 0, 1);
    if (err < 0)
        return conn_failed(res, fd, -err);
    if (got == 0) {
        close(fd);
        return CVTPM_ACCEPT_NEXT;
    }
    return hand_off(res, fd, got, 0);
}

int cvtpm_serve_listener(int lfd, int stopfd, int timeout_ms, int tcp, uint32_t maxcmd, int reject_loc4,
                         int once, const int32_t *stop, unsigned char *buf, uint32_t bufcap,
                         struct cvtpm_accept_result *res)
{
    uint32_t outcap = 4096 + 8;
    unsigned char *out = malloc(outcap);
    int64_t end = now_ns() + (int64_t)timeout_ms * 1000000;
    int status;

    memset(res, 0, sizeof(*res));
    res->fd = -1;
    if (out == NULL) {
        res->err = ENOMEM;
        return CVTPM_ACCEPT_ERR;
    }
    if (bufcap < CVTPM_PREFIX_LEN + maxcmd) {
        free(out);
        res->err = EINVAL;
        return CVTPM_ACCEPT_ERR;
    }
    for (;;) {
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE)) {
            status = CVTPM_ACCEPT_STOPPED;
            break;
        }
        // On a fixed schedule, so that a client that keeps connecting
        // cannot put off the caller's checks.
        if (now_ns() >= end) {
            status = CVTPM_ACCEPT_TIMEOUT;
            break;
        }
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                res->err = errno;
                status = CVTPM_ACCEPT_ERR;
                break;
            }
            int64_t left = end - now_ns();
            if (left <= 0) {
                status = CVTPM_ACCEPT_TIMEOUT;
                break;
            }
            struct pollfd p[2] = {{.fd = lfd, .events = POLLIN}, {.fd = stopfd, .events = POLLIN}};
            struct timespec ts = {left / 1000000000, left % 1000000000};
            if (ppoll(p, 2, &ts, NULL) < 0 && errno != EINTR) {
                res->err = errno;
                status = CVTPM_ACCEPT_ERR;
                break;
            }
            continue;
        }
        res->accepted++;
        if (tcp) {
            // Answers go out at once, as net sets for its connections.
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        }
        status = serve_first(fd, lfd, maxcmd, reject_loc4, once, stop, buf, bufcap, &out, &outcap, res);
        if (status != CVTPM_ACCEPT_NEXT)
            break;
    }
    free(out);
    return status;
}
