// Shared between stream.c and the Go side of the engine (stream.go).
#ifndef CVTPM_STREAM_H
#define CVTPM_STREAM_H
#include <stdint.h>

#define CVTPM_TPM_SEND_COMMAND 8 // the mssim prefix: u32 8 | u8 locality | u32 size
#define CVTPM_PREFIX_LEN 9

// TPM 2.0 response codes swtpm puts in its own error responses.
#define CVTPM_RC_INSUFFICIENT 0x09a
#define CVTPM_RC_LOCALITY 0x107
#define CVTPM_RC_FAILURE 0x101

// How a stream ended.
#define CVTPM_STREAM_EOF 0       // the peer closed between commands (or once was set)
#define CVTPM_STREAM_TRUNCATED 1 // the peer closed within a command
#define CVTPM_STREAM_STOPPED 2   // *stop was set
#define CVTPM_STREAM_BAD_FRAME 3 // bytes that cannot be a command: header holds them
#define CVTPM_STREAM_IOERR 4     // a read, write or poll failed: err is its errno

struct cvtpm_frame {
    int prefixed;
    uint8_t locality;
    uint32_t start, end;
};

struct cvtpm_stream_end {
    int err;
    uint64_t commands;
    unsigned char header[CVTPM_PREFIX_LEN];
    int header_len;
};

// How an accept loop call ended (cvtpm_serve_listener).
#define CVTPM_ACCEPT_NEXT 0      // internal: the connection is done with, accept the next
#define CVTPM_ACCEPT_HANDOFF 1   // fd goes on elsewhere, its first pending bytes in buf
#define CVTPM_ACCEPT_TIMEOUT 2   // nothing to accept before the timeout
#define CVTPM_ACCEPT_STOPPED 3   // *stop was set
#define CVTPM_ACCEPT_ERR 4       // accept or poll failed: err
#define CVTPM_ACCEPT_CONN_ERR 5  // a connection failed (closed): err
#define CVTPM_ACCEPT_TRUNCATED 6 // a connection closed within its first command (closed)
#define CVTPM_ACCEPT_BAD_FRAME 7 // a connection sent bytes that cannot be a command (closed): header

struct cvtpm_accept_result {
    int fd, idle, err;
    uint32_t pending;
    uint64_t accepted;
    unsigned char header[CVTPM_PREFIX_LEN];
    int header_len;
};

void cvtpm_lock(void);
void cvtpm_unlock(void);
extern int cvtpm_running;
void cvtpm_free_response_buffer(void);
// cvtpm_execute runs cmd (at locality loc; below 0 the current one) and
// copies the response to out when it fits in room (at least 10), or to
// *big, which the caller frees, when it does not.
uint32_t cvtpm_execute(int loc, const unsigned char *cmd, uint32_t len,
                       unsigned char *out, uint32_t room, unsigned char **big, uint32_t *rc);
uint32_t cvtpm_parse_frame(const unsigned char *b, uint32_t n, uint32_t maxcmd, struct cvtpm_frame *f);
int cvtpm_serve_stream(int fd, const unsigned char *pending, uint32_t npending, uint32_t maxcmd,
                       int reject_loc4, int once, const int32_t *stop, struct cvtpm_stream_end *end);
uint32_t cvtpm_answer(const unsigned char *in, const struct cvtpm_frame *f, int reject_loc4,
                      unsigned char **out, uint32_t *outcap, uint32_t *rc);
int cvtpm_write_all(int fd, const unsigned char *b, uint32_t n);
int cvtpm_serve_listener(int lfd, int stopfd, int timeout_ms, int tcp, uint32_t maxcmd, int reject_loc4,
                         int once, const int32_t *stop, unsigned char *buf, uint32_t bufcap,
                         struct cvtpm_accept_result *res);
#endif
