/* systemd's service notifications (Type=notify, sd_notify(3)): datagrams to
 * the socket $NOTIFY_SOCKET names. READY=1 once the mount answers, with
 * STATUS=serving step N; STATUS again after each swap; STOPPING=1 on the
 * way out. Without $NOTIFY_SOCKET every call is a no-op. */
#ifndef DWSFS_FS_NOTIFY_H
#define DWSFS_FS_NOTIFY_H

#include <stdint.h>

/* Reads $NOTIFY_SOCKET and removes it from the environment (an on_swap
 * command is not the service). Call before any thread starts. */
void notify_init(void);
/* The root now serves step (said at once when ready was, else with it). */
void notify_step(uint64_t step);
/* The mount answers: READY=1 (once) with the step. */
void notify_ready(void);
void notify_stopping(void);

#endif
