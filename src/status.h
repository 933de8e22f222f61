/* .dwsfs/status: a snapshot of the engine written as JSON (field by field
 * in docs/status.md). */
#ifndef DWSFS_STATUS_H
#define DWSFS_STATUS_H

#include "histogram.h"
#include "hook.h"
#include "internal.h"


/* The document, malloc'd, ending in a newline. */
char *dws_status_json(const dws_status *st, const dws_status_field *extra, size_t nextra);

#endif
