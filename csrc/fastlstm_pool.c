/*
 * A small thread pool for the row kernel: the caller and up to FL_MAX_THREADS - 1 workers split a
 * range of column blocks. Work is split by columns only, and every column is computed by the same
 * instructions whichever thread takes it, so results are bitwise the same for any thread count.
 *
 * The time loop hands out a job per step, tens of microseconds apart, so a worker spins for a while
 * after a job before it sleeps on the condition variable; waking a sleeping thread costs more than a
 * small job. Only one caller uses the pool at a time: a call that finds it busy (another Python
 * thread is inside a kernel) runs its job alone. A child process after fork starts without workers
 * and creates its own on first use.
 */
#include "fastlstm_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FL_PAUSE() _mm_pause()
#else
#define FL_PAUSE() ((void)0)
#endif

/* How long a worker spins after a job before it sleeps, in nanoseconds. */
#define FL_SPIN_NS 200000

static int64_t now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t workers[FL_MAX_THREADS];
    int started;                     /* workers running, under lock */
    int threads;                     /* threads per job, the caller included */
    atomic_flag busy;                /* held by the caller that owns the pool */
    atomic_uint_fast64_t generation; /* bumped once per job */
    atomic_int finished;             /* workers done with the current job */
    atomic_int resting;              /* set by fl_pool_rest: sleep now instead of spinning */
    int parts;                       /* parts of the current job, the caller's included */
    fl_task task;
    void *context;
    int64_t items;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 0, 1, ATOMIC_FLAG_INIT, 0, 0,
          0, 1, NULL, NULL, 0};

static void run_part(int part)
{
    const int64_t begin = pool.items * part / pool.parts;
    const int64_t end = pool.items * (part + 1) / pool.parts;
    if (begin < end) {
        pool.task(pool.context, begin, end);
    }
}

/* The generation each worker was created in, so that it waits for the job that follows. Reading
 * the counter from the new thread instead could miss a job that starts before the thread runs. */
static uint_fast64_t created_in[FL_MAX_THREADS];

static void *worker_main(void *arg)
{
    const int part = (int)(intptr_t)arg;
    uint_fast64_t seen = created_in[part];
    for (;;) {
        const int64_t spin_end = now_ns() + FL_SPIN_NS;
        for (int spins = 1; atomic_load_explicit(&pool.generation, memory_order_acquire) == seen;
             spins++) {
            FL_PAUSE();
            if (spins % 64 == 0
                && (now_ns() > spin_end || atomic_load_explicit(&pool.resting, memory_order_relaxed))) {
                break;
            }
        }
        if (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
                pthread_cond_wait(&pool.wake, &pool.lock);
            }
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (part < pool.parts) {
            run_part(part);
        }
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
    }
    return NULL;
}

/* The workers die with the parent's threads at fork; the child starts over. */
static void reset_in_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
    atomic_flag_clear(&pool.busy);
}

/* Starts workers up to threads - 1 under the lock; returns how many run. */
static int start_workers(int threads)
{
    static int at_fork_registered = 0;
    pthread_mutex_lock(&pool.lock);
    if (!at_fork_registered) {
        at_fork_registered = pthread_atfork(NULL, NULL, reset_in_child) == 0;
    }
    while (pool.started < threads - 1) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        created_in[pool.started + 1] = atomic_load_explicit(&pool.generation, memory_order_relaxed);
        int error = pthread_create(&pool.workers[pool.started], &attr, worker_main,
                                   (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (error != 0) {
            break;
        }
        pool.started++;
    }
    int started = pool.started;
    pthread_mutex_unlock(&pool.lock);
    return started;
}

int fl_set_num_threads(int threads)
{
    if (threads < 1 || threads > FL_MAX_THREADS) {
        return -1;
    }
    pool.threads = threads;
    return 0;
}

int fl_get_num_threads(void)
{
    return pool.threads;
}

void fl_parallel_for(int64_t items, int64_t min_items_per_thread, fl_task task, void *context)
{
    int threads = pool.threads;
    if (min_items_per_thread < 1) {
        min_items_per_thread = 1;
    }
    if (threads > items / min_items_per_thread) {
        threads = (int)(items / min_items_per_thread);
    }
    if (threads <= 1 || atomic_flag_test_and_set_explicit(&pool.busy, memory_order_acquire)) {
        task(context, 0, items);
        return;
    }
    const int workers = start_workers(threads);
    if (workers < 1) {
        atomic_flag_clear_explicit(&pool.busy, memory_order_release);
        task(context, 0, items);
        return;
    }

    /* Every started worker wakes for every job; those past the job's parts only report back. */
    pool.parts = threads < workers + 1 ? threads : workers + 1;
    pool.task = task;
    pool.context = context;
    pool.items = items;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.resting, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_part(0);
    while (atomic_load_explicit(&pool.finished, memory_order_acquire) < workers) {
        FL_PAUSE();
    }
    atomic_flag_clear_explicit(&pool.busy, memory_order_release);
}

void fl_pool_rest(void)
{
    atomic_store_explicit(&pool.resting, 1, memory_order_relaxed);
}
