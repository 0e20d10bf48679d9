#ifndef CVTPM_PUMP_H
#define CVTPM_PUMP_H
/* Starts a detached thread that copies bytes between sockets a and b
 * until either side ends, then closes a, b and done. stop is polled and
 * ends the copy when readable; the caller keeps it open until done is
 * closed. Returns 0, or an errno value (nothing was started, and the
 * caller still owns every descriptor). */
int cvtpm_pump_start(int a, int b, int stop, int done);
#endif
