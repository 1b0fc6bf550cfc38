/* Internal thread pool of the C core (see fastlstm_pool.c). */
#ifndef FASTLSTM_POOL_H
#define FASTLSTM_POOL_H

#include "fastlstm.h"

/* Runs task(context, begin, end) over [0, items), cut into contiguous chunks of at least
 * min_items_per_thread items that the pool's threads share. Returns when every chunk is done. */
typedef void (*fl_task)(void *context, int64_t begin, int64_t end);
void fl_parallel_for(int64_t items, int64_t min_items_per_thread, fl_task task, void *context);

/* Sends spinning workers to sleep: before BLAS, whose own threads want the cores, and at the end of
 * a call. The next fl_parallel_for wakes them. */
void fl_pool_rest(void);

#endif /* FASTLSTM_POOL_H */
