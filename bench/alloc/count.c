/* LD_PRELOAD shim for bench/alloc-per-write.sh: counts malloc, calloc,
 * realloc and the aligned allocators of the process it is loaded into and,
 * when ALLOC_COUNT is set, writes "malloc calloc realloc aligned" counts to
 * $ALLOC_COUNT.<pid> every second. Build: cc -O2 -shared -fPIC. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <unistd.h>
#include <string.h>
static atomic_ulong n_malloc, n_calloc, n_realloc, n_memalign;
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
void *malloc(size_t s) { atomic_fetch_add_explicit(&n_malloc, 1, memory_order_relaxed); return __libc_malloc(s); }
void *calloc(size_t a, size_t b) { atomic_fetch_add_explicit(&n_calloc, 1, memory_order_relaxed); return __libc_calloc(a, b); }
void *realloc(void *p, size_t s) { atomic_fetch_add_explicit(&n_realloc, 1, memory_order_relaxed); return __libc_realloc(p, s); }
int posix_memalign(void **p, size_t a, size_t s) { atomic_fetch_add_explicit(&n_memalign, 1, memory_order_relaxed); *p = __libc_memalign(a, s); return *p ? 0 : 12; }
void *aligned_alloc(size_t a, size_t s) { atomic_fetch_add_explicit(&n_memalign, 1, memory_order_relaxed); return __libc_memalign(a, s); }
void *memalign(size_t a, size_t s) { atomic_fetch_add_explicit(&n_memalign, 1, memory_order_relaxed); return __libc_memalign(a, s); }
static void *dumper(void *arg) {
  char path[4096]; snprintf(path, sizeof path, "%s.%d", getenv("ALLOC_COUNT"), getpid());
  for (;;) { sleep(1); FILE *f = fopen(path, "w"); if (f) { fprintf(f, "%lu %lu %lu %lu\n", n_malloc, n_calloc, n_realloc, n_memalign); fclose(f);} }
  return 0;
}
__attribute__((constructor)) static void init(void) { pthread_t t; if (getenv("ALLOC_COUNT")) pthread_create(&t, 0, dumper, 0); }
