// The copy loop of package pump: one thread per pair, outside Go's
// runtime, so that a message costs this thread's wake-up and two system
// calls, not a netpoller wake-up and a goroutine switch per direction.
#include "pump.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

enum { pump_buf = 64 << 10 };

struct pump_dir {
	int src, dst;
	char buf[pump_buf];
	size_t off, len; /* buffered bytes not yet sent: buf[off:len] */
	int eof;         /* src ended; dst is half-closed once flushed */
	int shut;        /* dst half-closed: this direction is done */
};

struct pump {
	int a, b, stop, done;
	struct pump_dir d[2]; /* a->b, b->a */
};

/* flush sends what dir holds; returns -1 on an error that ends the pair. */
static int flush(struct pump_dir *dir)
{
	while (dir->off < dir->len) {
		ssize_t n = send(dir->dst, dir->buf + dir->off, dir->len - dir->off, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0; /* backpressure: wait for POLLOUT */
			return -1;
		}
		dir->off += (size_t)n;
	}
	dir->off = dir->len = 0;
	return 0;
}

/* fill reads once from src when dir's buffer is empty and sends it on;
 * returns -1 on an error that ends the pair. */
static int fill(struct pump_dir *dir)
{
	ssize_t n;
	do {
		n = recv(dir->src, dir->buf, pump_buf, 0);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
	if (n == 0) {
		dir->eof = 1;
		return 0;
	}
	dir->off = 0;
	dir->len = (size_t)n;
	return flush(dir);
}

static void *pump_run(void *arg)
{
	struct pump *p = arg;
	/* Named, so that ps, top and the tests tell pump threads from the Go
	 * runtime's (which never exit, and so cannot show a leak). */
	prctl(PR_SET_NAME, "cvtpm-pump", 0, 0, 0);
	for (;;) {
		struct pollfd fds[3] = {
			{ .fd = p->a }, { .fd = p->b }, { .fd = p->stop, .events = POLLIN },
		};
		for (int i = 0; i < 2; i++) {
			struct pump_dir *dir = &p->d[i];
			if (dir->eof && dir->len == 0 && !dir->shut) {
				/* Pass the half-close on; the other direction goes on
				 * until its side ends too (a client that sends its
				 * request, shuts down its sending and waits for the
				 * answer gets it). */
				shutdown(dir->dst, SHUT_WR);
				dir->shut = 1;
			}
			if (dir->shut) {
				continue;
			} else if (dir->len > 0) {
				fds[1 - i].events |= POLLOUT; /* fds[1-i].fd == dir->dst */
			} else {
				fds[i].events |= POLLIN;
			}
		}
		if (p->d[0].shut && p->d[1].shut)
			break;
		/* A side nobody waits on is left out: its POLLHUP alone would
		 * otherwise wake this loop again and again while the other side
		 * holds back its sending. */
		for (int i = 0; i < 2; i++)
			if (fds[i].events == 0)
				fds[i].fd = -1;
		if (poll(fds, 3, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (fds[2].revents)
			break;
		int failed = 0;
		for (int i = 0; i < 2 && !failed; i++) {
			struct pump_dir *dir = &p->d[i];
			if (dir->shut) {
				continue;
			} else if (dir->len > 0) {
				if (fds[1 - i].revents)
					failed = flush(dir) < 0;
			} else if (fds[i].revents) {
				failed = fill(dir) < 0;
			}
		}
		if (failed)
			break;
	}
	close(p->a);
	close(p->b);
	close(p->done);
	free(p);
	return NULL;
}

int cvtpm_pump_start(int a, int b, int stop, int done)
{
	struct pump *p = calloc(1, sizeof *p);
	if (p == NULL)
		return ENOMEM;
	p->a = a;
	p->b = b;
	p->stop = stop;
	p->done = done;
	p->d[0].src = a;
	p->d[0].dst = b;
	p->d[1].src = b;
	p->d[1].dst = a;
	pthread_attr_t attr;
	int err = pthread_attr_init(&attr);
	if (err != 0) {
		free(p);
		return err;
	}
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	/* The loop needs little stack; the buffers are on the heap. */
	pthread_attr_setstacksize(&attr, 64 << 10);
	pthread_t t;
	err = pthread_create(&t, &attr, pump_run, p);
	pthread_attr_destroy(&attr);
	if (err != 0)
		free(p);
	return err;
}
