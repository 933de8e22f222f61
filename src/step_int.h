/* A step's insides: private to the step module (step.c, stepread.c,
 * compaction.c). Everyone else goes through step.h. */
#ifndef DWSFS_STEP_INT_H
#define DWSFS_STEP_INT_H

#include "step.h"

#include <pthread.h>

/* What a step reads per tensor: its source and its patch. Immutable once
 * the step is built; a merge makes a new table (the same bytes, fewer runs)
 * and swaps it in, so everyone holding the step reads the merged runs, and
 * the old ones go with the last read under way. */
typedef struct dws_steptab {
	atomic_long refs;
	size_t n;
	dws_src *src;          /* per slot */
	dws_patchset **patch;  /* per slot, NULL: unpatched */
	uint8_t *trained;      /* per slot: the trainer's files provide it */
} dws_steptab;

struct dws_step {
	atomic_long refs;
	uint64_t step, anchor, id;
	size_t chain;
	dws_layout *layout;
	pthread_mutex_t lock;  /* guards tab's pointer */
	dws_steptab *tab;
};

/* The step's table as it is now (a reference: dws_steptab_put). */
dws_steptab *dws_step_tab(dws_step *s);
void dws_steptab_put(dws_steptab *t);
/* A table sharing t's sources and patches (a reference to each). */
dws_steptab *dws_steptab_copy(const dws_steptab *t);
/* t in place of the step's table (t's reference is taken over). */
void dws_step_swap_tab(dws_step *s, dws_steptab *t);

#endif
