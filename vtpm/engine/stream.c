// The engine's lock, its running flag, command execution, and the data
// stream loop (stream.go says why it is in C).
#include <errno.h>
#include <poll.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>
#include "stream.h"
#include "_cgo_export.h"

// Every libtpms call, from Go or from a stream loop, holds the engine's
// lock; so do cvtpm_running, cvtpm_locality and the response buffer. It is
// a semaphore, not a mutex: Go takes it and releases it in separate cgo
// calls, between which the goroutine may move to another thread, and a
// mutex must be unlocked by the thread that locked it.
static sem_t cvtpm_sem;
int cvtpm_running;
extern TPM_MODIFIER_INDICATOR cvtpm_locality;

// libtpms' response buffer, reused across commands (it grows, never shrinks).
static unsigned char *rbuf;
static uint32_t rtotal;

__attribute__((constructor)) static void cvtpm_sem_init(void) { sem_init(&cvtpm_sem, 0, 1); }

void cvtpm_lock(void)
{
    while (sem_wait(&cvtpm_sem) != 0) // only EINTR
        ;
}

void cvtpm_unlock(void) { sem_post(&cvtpm_sem); }

void cvtpm_free_response_buffer(void)
{
    free(rbuf);
    rbuf = NULL;
    rtotal = 0;
}

static uint32_t put_error(unsigned char *out, uint32_t rc)
{
    static const unsigned char head[6] = {0x80, 0x01, 0, 0, 0, 10};
    memcpy(out, head, 6);
    out[6] = rc >> 24;
    out[7] = rc >> 16;
    out[8] = rc >> 8;
    out[9] = rc;
    return 10;
}

// An error response made under the lock.
static unsigned char errbuf[10];

// execute_locked runs cmd at locality loc (below 0: the current one;
// otherwise it becomes the current one) and returns the response, in
// libtpms' buffer or errbuf, valid until the lock is released. A stopped
// TPM answers TPM_RC_FAILURE, a command shorter than a header
// TPM_RC_INSUFFICIENT, as swtpm does. *rc is libtpms' result when it
// failed (then TPM_RC_FAILURE is the answer), else 0.
static const unsigned char *execute_locked(int loc, const unsigned char *cmd, uint32_t len,
                                           uint32_t *n, uint32_t *rc)
{
    uint32_t rlen = 0;
    *rc = 0;
    if (loc >= 0)
        cvtpm_locality = (TPM_MODIFIER_INDICATOR)loc;
    if (!cvtpm_running) {
        *n = put_error(errbuf, CVTPM_RC_FAILURE);
        return errbuf;
    }
    if (len < 10) {
        *n = put_error(errbuf, CVTPM_RC_INSUFFICIENT);
        return errbuf;
    }
    *rc = TPMLIB_Process(&rbuf, &rlen, &rtotal, (unsigned char *)cmd, len);
    if (*rc != 0 || rlen == 0) {
        if (*rc == 0)
            *rc = TPM_FAIL;
        *n = put_error(errbuf, CVTPM_RC_FAILURE);
        return errbuf;
    }
    *n = rlen;
    return rbuf;
}

uint32_t cvtpm_execute(int loc, const unsigned char *cmd, uint32_t len,
                       unsigned char *out, uint32_t room, unsigned char **big, uint32_t *rc)
{
    uint32_t n;
    *big = NULL;
    cvtpm_lock();
    const unsigned char *p = execute_locked(loc, cmd, len, &n, rc);
    if (n > room) {
        // A copy for the caller to take and free: the lock is released
        // here, on the thread that took it.
        if ((*big = malloc(n)) != NULL) {
            memcpy(*big, p, n);
        } else {
            if (*rc == 0)
                *rc = TPM_SIZE;
            n = put_error(out, CVTPM_RC_FAILURE);
        }
    } else {
        memcpy(out, p, n);
    }
    cvtpm_unlock();
    return n;
}

static uint32_t be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

// cvtpm_parse_frame is swtpmproto.ParseFrame: the data channel carries a
// raw TPM command, or one behind the TPM_SEND_COMMAND prefix
// (u32 8 | u8 locality | u32 size). It returns the bytes needed (more than
// n while incomplete) and fills f once complete, or 0 for bytes that
// cannot be a command of at most maxcmd bytes.
uint32_t cvtpm_parse_frame(const unsigned char *b, uint32_t n, uint32_t maxcmd, struct cvtpm_frame *f)
{
    uint32_t size;
    if (n < 6)
        return 6;
    if (b[0] == 0 && b[1] == 0 && be32(b) == CVTPM_TPM_SEND_COMMAND) {
        if (n < CVTPM_PREFIX_LEN)
            return CVTPM_PREFIX_LEN;
        size = be32(b + 5);
        if (size < 10 || size > maxcmd)
            return 0;
        f->prefixed = 1;
        f->locality = b[4];
        f->start = CVTPM_PREFIX_LEN;
        f->end = CVTPM_PREFIX_LEN + size;
        return f->end;
    }
    size = be32(b + 2);
    if (size < 10 || size > maxcmd)
        return 0;
    f->prefixed = 0;
    f->locality = 0;
    f->start = 0;
    f->end = size;
    return size;
}

static int wait_fd(int fd, short events)
{
    struct pollfd p = {.fd = fd, .events = events};
    for (;;) {
        int n = poll(&p, 1, -1);
        if (n >= 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

int cvtpm_write_all(int fd, const unsigned char *b, uint32_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        if (w >= 0) {
            b += w;
            n -= (uint32_t)w;
            continue;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int err = wait_fd(fd, POLLOUT);
            if (err)
                return err;
            continue;
        }
        return -errno;
    }
    return 0;
}

// cvtpm_answer runs frame f of in and puts the full reply in *out (of *outcap
// bytes, grown when a response needs it); it returns the reply's length.
uint32_t cvtpm_answer(const unsigned char *in, const struct cvtpm_frame *f, int reject_loc4,
                       unsigned char **out, uint32_t *outcap, uint32_t *rc)
{
    const unsigned char *cmd = in + f->start, *p;
    uint32_t len = f->end - f->start, n, head = f->prefixed ? 4 : 0;
    unsigned char *o;
    *rc = 0;
    // size | response | u32 0 answers TPM_SEND_COMMAND, as swtpm does.
    if (f->prefixed && (f->locality > 4 || (f->locality == 4 && reject_loc4))) {
        n = put_error(*out + head, CVTPM_RC_LOCALITY);
    } else {
        cvtpm_lock();
        p = execute_locked(f->prefixed ? f->locality : -1, cmd, len, &n, rc);
        if (n + 8 > *outcap && (o = realloc(*out, n + 8)) != NULL) {
            *out = o;
            *outcap = n + 8;
        }
        if (n + 8 > *outcap) { // out of memory
            if (*rc == 0)
                *rc = TPM_SIZE;
            n = put_error(*out + head, CVTPM_RC_FAILURE);
        } else {
            memcpy(*out + head, p, n);
        }
        cvtpm_unlock();
    }
    if (!f->prefixed)
        return n;
    o = *out;
    o[0] = n >> 24;
    o[1] = n >> 16;
    o[2] = n >> 8;
    o[3] = n;
    memset(o + 4 + n, 0, 4);
    return n + 8;
}

int cvtpm_serve_stream(int fd, const unsigned char *pending, uint32_t npending, uint32_t maxcmd,
                       int reject_loc4, int once, const int32_t *stop, struct cvtpm_stream_end *end)
{
    // A frame is at most the prefix and maxcmd bytes; reading ahead up
    // to a page more keeps a pipelined next command in one read.
    uint32_t incap = CVTPM_PREFIX_LEN + maxcmd + 4096 + npending, outcap = 4096 + 8;
    uint32_t len = 0, need, rc;
    int status = CVTPM_STREAM_EOF;
    unsigned char *in = malloc(incap), *out = malloc(outcap);
    struct cvtpm_frame f;

    memset(end, 0, sizeof(*end));
    if (in == NULL || out == NULL) {
        end->err = ENOMEM;
        status = CVTPM_STREAM_IOERR;
        goto done;
    }
    memcpy(in, pending, npending);
    len = npending;
    for (;;) {
        while ((need = cvtpm_parse_frame(in, len, maxcmd, &f)) > len) {
            // Wait in poll for POLLIN, as swtpm does, and only then read:
            // a thread blocked in read(2) on a unix socket also wakes each
            // time the peer takes bytes from it (the kernel's write-space
            // wake-up shares the socket's wait queue and is not filtered
            // by event), so a client that reads an answer and then works
            // before its next command cost this thread a second wake-up
            // and sleep per command; poll's wait is filtered.
            int werr = wait_fd(fd, POLLIN);
            if (werr) {
                end->err = -werr;
                status = CVTPM_STREAM_IOERR;
                goto done;
            }
            ssize_t r = read(fd, in + len, incap - len);
            if (r > 0) {
                len += (uint32_t)r;
                continue;
            }
            if (r == 0) {
                status = len > 0 ? CVTPM_STREAM_TRUNCATED : CVTPM_STREAM_EOF;
                goto done;
            }
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                // A non-blocking descriptor, or a receive timeout passed:
                // wait without one. Only this thread waits.
                int err = wait_fd(fd, POLLIN);
                if (err == 0)
                    continue;
                errno = -err;
            }
            end->err = errno;
            status = CVTPM_STREAM_IOERR;
            goto done;
        }
        if (need == 0) {
            end->header_len = len < CVTPM_PREFIX_LEN ? len : CVTPM_PREFIX_LEN;
            memcpy(end->header, in, end->header_len);
            status = CVTPM_STREAM_BAD_FRAME;
            goto done;
        }
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE)) { // stopped while the command arrived
            status = CVTPM_STREAM_STOPPED;
            goto done;
        }
        uint32_t n = cvtpm_answer(in, &f, reject_loc4, &out, &outcap, &rc);
        if (rc != 0)
            cvtpmGoProcessFailed(rc);
        int err = cvtpm_write_all(fd, out, n);
        if (err) {
            end->err = -err;
            status = CVTPM_STREAM_IOERR;
            goto done;
        }
        end->commands++;
        // Keep any bytes of the next command that arrived with this one.
        len -= f.end;
        memmove(in, in + f.end, len);
        if (once) {
            status = CVTPM_STREAM_EOF;
            goto done;
        }
        if (__atomic_load_n(stop, __ATOMIC_ACQUIRE)) {
            status = CVTPM_STREAM_STOPPED;
            goto done;
        }
    }
done:
    free(in);
    free(out);
    return status;
}
