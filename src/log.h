/* Logging: one line per event, with a level, to stderr, syslog or a file.
 * A leaf module: every layer logs through it, it calls nothing of theirs. */
#ifndef DWSFS_LOG_H
#define DWSFS_LOG_H

#include "dwsfs/dwsfs.h"

#define dws_log_error(...) dws_log_at(DWS_LOG_ERROR, __VA_ARGS__)
#define dws_log_warn(...) dws_log_at(DWS_LOG_WARN, __VA_ARGS__)
#define dws_log_info(...) dws_log_at(DWS_LOG_INFO, __VA_ARGS__)
#define dws_log_debug(...) dws_log_at(DWS_LOG_DEBUG, __VA_ARGS__)

/* Whether a line at lv is written (skip building an expensive one). */
bool dws_log_enabled(dws_log_level lv);
const char *dws_log_level_name(dws_log_level lv);

#endif
