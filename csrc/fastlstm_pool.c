/*
 * A small thread pool for the row kernel, the cell and the softmax. A job is a range of items
 * (column blocks or rows) cut into FL_CHUNKS_PER_THREAD chunks per thread, which the caller and the
 * workers claim, each its own first, until none is left. Every item is computed by the same
 * instructions whichever thread claims it, so results are bitwise the same for any thread count.
 *
 * Claiming, rather than a fixed share per thread, matters on a busy machine: when a worker is not
 * scheduled (another library's threads spin on the other core), the caller takes its chunks instead
 * of waiting for it. Taking its own chunks first keeps each thread on the same columns from call to
 * call while nothing is late. The time loop hands out a job per step, microseconds apart, so a worker spins
 * for a while after a job before it sleeps on the condition variable. Only one caller uses the pool
 * at a time: a call that finds it busy (another Python thread is inside a kernel) runs its job
 * alone. A child process after fork starts without workers and creates its own on first use.
 */
#include "fastlstm_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FL_PAUSE() _mm_pause()
/* The SSE control and status register: rounding mode, and whether subnormal results are flushed to
 * zero and subnormal inputs read as zero (FTZ and DAZ, which some libraries switch on). */
#define FL_FP_CONTROL() _mm_getcsr()
#define FL_SET_FP_CONTROL(value) _mm_setcsr(value)
#define FL_FP_CONTROL_BITS 0xFFC0u   /* DAZ, exception masks, rounding, FTZ; not the status flags */
#else
#define FL_PAUSE() ((void)0)
#define FL_FP_CONTROL() 0u
#define FL_SET_FP_CONTROL(value) ((void)(value))
#define FL_FP_CONTROL_BITS 0u
#endif

/* Chunks per thread: more of them balance better when a thread loses its core, but each chunk of a
 * product copies its rows of A again. On 2 threads of the idle benchmark machine, a training window
 * of the character model took 57 ms with 1 chunk per thread, 61 ms with 2 and 70 ms with 4. The
 * wide inference case took 7 % less time with 1 than with 2. */
#define FL_CHUNKS_PER_THREAD 1

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
    atomic_int threads;              /* threads per job, the caller included */
    atomic_flag busy;                /* held by the caller that owns the pool */
    atomic_uint_fast64_t generation; /* bumped once per job */
    atomic_int resting;              /* set by fl_pool_rest: sleep now instead of spinning */
    atomic_int open;                 /* 1 while the current job hands out chunks */
    atomic_int active;               /* workers inside the current job */
    atomic_flag taken[FL_MAX_THREADS * FL_CHUNKS_PER_THREAD];   /* chunks claimed in this job */
    unsigned int fp_control;         /* the caller's floating-point control flags for this job */
    atomic_int helpers;              /* workers the current job may use: 1 .. helpers */
    int64_t chunks, items;
    fl_task task;
    void *context;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER, .threads = 1,
          .busy = ATOMIC_FLAG_INIT};

static void run_chunk(int64_t chunk)
{
    const int64_t begin = pool.items * chunk / pool.chunks;
    const int64_t end = pool.items * (chunk + 1) / pool.chunks;
    if (begin < end) {
        pool.task(pool.context, begin, end);
    }
}

/* Claims and runs chunks of the current job until none is left: first the home chunks of thread
 * `home` (0 is the caller), then any other. Home chunks give each thread the same columns call after
 * call, so each core keeps its share of the weights in its own cache. Claiming the rest lets a
 * thread take over the chunks of a thread that has not started. */
static void run_chunks(int home)
{
    const int64_t threads = atomic_load_explicit(&pool.helpers, memory_order_relaxed) + 1;
    const int64_t first = pool.chunks * home / threads, end = pool.chunks * (home + 1) / threads;
    for (int64_t chunk = first; chunk < end; chunk++) {
        if (!atomic_flag_test_and_set_explicit(&pool.taken[chunk], memory_order_relaxed)) {
            run_chunk(chunk);
        }
    }
    for (int64_t chunk = 0; chunk < pool.chunks; chunk++) {
        if (!atomic_flag_test_and_set_explicit(&pool.taken[chunk], memory_order_relaxed)) {
            run_chunk(chunk);
        }
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
        if (part > atomic_load_explicit(&pool.helpers, memory_order_relaxed)) {
            continue;   /* started for a larger thread count than the current one */
        }

        /* Announce first, then check: either the caller finds this worker active and waits for it,
         * or this worker finds the job closed and touches nothing of it. The two stores and the two
         * loads are sequentially consistent, so one of the two must happen. */
        atomic_fetch_add(&pool.active, 1);
        if (atomic_load(&pool.open)) {
            /* A worker inherits its creator's flags at creation only. Taking the caller's flags for
             * every job keeps the results independent of the thread count when the caller changes
             * them later (flushing subnormals to zero, say). */
            const unsigned int own = FL_FP_CONTROL();
            if ((own & FL_FP_CONTROL_BITS) != pool.fp_control) {
                FL_SET_FP_CONTROL((own & ~FL_FP_CONTROL_BITS) | pool.fp_control);
            }
            run_chunks(part);
        }
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

/* The workers die with the parent's threads at fork; the child starts over. A job that another
 * parent thread was running is gone too, so its counts are cleared: the child would otherwise wait
 * forever for workers that no longer exist to leave it. */
static void reset_in_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
    atomic_store(&pool.open, 0);
    atomic_store(&pool.active, 0);
    atomic_store(&pool.helpers, 0);
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
    atomic_store_explicit(&pool.threads, threads, memory_order_relaxed);
    return 0;
}

int fl_get_num_threads(void)
{
    return atomic_load_explicit(&pool.threads, memory_order_relaxed);
}

void fl_parallel_for(int64_t items, int64_t min_items_per_thread, fl_task task, void *context)
{
    int threads = atomic_load_explicit(&pool.threads, memory_order_relaxed);
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
    if (start_workers(threads) < 1) {
        atomic_flag_clear_explicit(&pool.busy, memory_order_release);
        task(context, 0, items);
        return;
    }

    /* Up to FL_CHUNKS_PER_THREAD chunks per thread, each still worth waking a thread for. */
    int64_t chunks = items / min_items_per_thread;
    if (chunks > FL_CHUNKS_PER_THREAD * (int64_t)threads) {
        chunks = FL_CHUNKS_PER_THREAD * (int64_t)threads;
    }
    pool.chunks = chunks;
    pool.items = items;
    pool.task = task;
    pool.context = context;
    pool.fp_control = FL_FP_CONTROL() & FL_FP_CONTROL_BITS;
    atomic_store_explicit(&pool.helpers, threads - 1, memory_order_relaxed);
    for (int64_t chunk = 0; chunk < chunks; chunk++) {
        atomic_flag_clear_explicit(&pool.taken[chunk], memory_order_relaxed);
    }
    atomic_store_explicit(&pool.resting, 0, memory_order_relaxed);
    atomic_store(&pool.open, 1);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_chunks(0);
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.active) > 0) {
        FL_PAUSE();
    }
    atomic_flag_clear_explicit(&pool.busy, memory_order_release);
}

void fl_pool_rest(void)
{
    atomic_store_explicit(&pool.resting, 1, memory_order_relaxed);
}
