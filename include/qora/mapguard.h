/* qora — surviving a model file that shrinks under its memory map.

   The weights are read straight from a read-only shared mapping of the .qora file. If the file is
   truncated while mapped (an in-place rewrite, `cp` over it, a full disk, a network file system
   that fails a read), touching a page past the new end raises SIGBUS, whose default action kills
   the whole process: a server with every client, from whichever OpenMP worker thread happened to
   read the page. longjmp cannot get out of a fault raised on an OpenMP worker, so the handler
   below repairs the fault instead: it maps anonymous zero pages over the rest of the mapping from
   the faulting page on (MAP_FIXED, one async-signal-safe system call), marks the mapping
   poisoned and returns; the faulting load is retried and reads zeros. The computation finishes
   with garbage, and the caller checks qora_guard_poisoned() after every pass that read the
   mapping and refuses the result (qora/engine.py: ModelFileChangedError).

   Only SIGBUS raised by the kernel (si_code > 0) at an address inside a registered mapping is
   handled. Everything else goes to the handler that was there before (Python's faulthandler, the
   default action): a real crash stays a crash. SIGSEGV is deliberately not handled: a read-only
   file mapping only gives SIGSEGV for a write into it, a bug that must not be hidden (and that a
   read-only zero page would turn into an endless fault loop).

   The registry is a fixed table (no allocation in the handler); a slot's range is written before
   it is published with a release store and unpublished before the mapping can go away (the
   caller holds a buffer export of the mapping for as long as the slot is live, so a published
   range never belongs to anyone else). Registration happens with the GIL held: one writer. */
#ifndef QORA_MAPGUARD_H
#define QORA_MAPGUARD_H

#include <stddef.h>
#include <stdint.h>

#define QORA_GUARD_SLOTS 256 /* model files mapped at once */

#if (defined(__unix__) || defined(__APPLE__)) && (defined(__GNUC__) || defined(__clang__))
#define QORA_GUARD_SUPPORTED 1
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

typedef struct {
    uintptr_t start, end; /* page-aligned [start, end) */
    int used;             /* published (release) after start/end, cleared before the mapping can go */
    int poisoned;         /* a read faulted: the mapping now holds zero pages from there on */
} qora_guard_slot;

static qora_guard_slot qora_guard_slots[QORA_GUARD_SLOTS];
static uintptr_t qora_guard_page;        /* page size, read at registration (sysconf is not signal-safe) */
static struct sigaction qora_guard_prev; /* the SIGBUS action found when this handler went on top */
static int qora_guard_dying;             /* a foreign fault was passed on: the process is going down */

static void qora_guard_handler(int sig, siginfo_t* si, void* uc) {
    int saved_errno = errno;
    (void)uc;
    if (si != NULL && si->si_code > 0 && !__atomic_load_n(&qora_guard_dying, __ATOMIC_ACQUIRE)) {
        uintptr_t a = (uintptr_t)si->si_addr;
        for (int i = 0; i < QORA_GUARD_SLOTS; i++) {
            qora_guard_slot* s = &qora_guard_slots[i];
            if (!__atomic_load_n(&s->used, __ATOMIC_ACQUIRE)) continue;
            uintptr_t start = s->start, end = s->end;
            if (a < start || a >= end) continue;
            /* Everything from the faulting page to the end: past a truncation every page faults,
               so one repair per mapping instead of one signal per page. Threads faulting at the
               same time each map zeros over zeros: harmless. */
            uintptr_t from = a & ~(qora_guard_page - 1);
            void* r = mmap((void*)from, end - from, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (r != MAP_FAILED) {
                __atomic_store_n(&s->poisoned, 1, __ATOMIC_RELEASE);
                errno = saved_errno;
                return; /* the faulting read runs again and sees zeros */
            }
            break; /* cannot repair it: fall through to the previous action, as without the guard */
        }
    }
    /* Not ours. Hand the signal to the action that was there before and let it act: a fault from
       the kernel repeats when this handler returns, a sent signal is sent again. A second foreign
       entry (the previous handler re-raised into this one, as Python's faulthandler does when it
       was enabled after us) gets the default action, so the chain cannot loop. */
    int second = __atomic_exchange_n(&qora_guard_dying, 1, __ATOMIC_ACQ_REL);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, second ? &dfl : &qora_guard_prev, NULL);
    if (si == NULL || si->si_code <= 0) raise(sig); /* delivered once this handler returns */
    errno = saved_errno;
}

static int qora_guard_is_ours(const struct sigaction* sa) {
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == qora_guard_handler;
}

/* Put the handler on top of SIGBUS unless it is there already (another library, or Python's
   faulthandler, may have installed its own since); what it replaces becomes the previous action.
   0, or an errno value. Cheap (one sigaction query): called before every forward pass. */
static int qora_guard_install(void) {
    struct sigaction cur, sa;
    if (sigaction(SIGBUS, NULL, &cur) != 0) return errno;
    if (qora_guard_is_ours(&cur)) return 0;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = qora_guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    qora_guard_prev = cur;
    __atomic_store_n(&qora_guard_dying, 0, __ATOMIC_RELEASE);
    if (sigaction(SIGBUS, &sa, NULL) != 0) return errno;
    return 0;
}

/* Watch [addr, addr + len) (a whole mapping: addr page-aligned). The slot index, -1 when the table
   is full, -2 when addr is not page-aligned or len is 0. */
static int qora_guard_register(const void* addr, size_t len) {
    if (qora_guard_page == 0) {
        long p = sysconf(_SC_PAGESIZE);
        qora_guard_page = p > 0 ? (uintptr_t)p : 4096;
    }
    uintptr_t start = (uintptr_t)addr;
    if (len == 0 || (start & (qora_guard_page - 1))) return -2;
    for (int i = 0; i < QORA_GUARD_SLOTS; i++) {
        qora_guard_slot* s = &qora_guard_slots[i];
        if (__atomic_load_n(&s->used, __ATOMIC_ACQUIRE)) continue;
        s->start = start;
        s->end = (start + len + qora_guard_page - 1) & ~(qora_guard_page - 1);
        __atomic_store_n(&s->poisoned, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&s->used, 1, __ATOMIC_RELEASE);
        return i;
    }
    return -1;
}

static void qora_guard_unregister(int slot) {
    if (slot >= 0 && slot < QORA_GUARD_SLOTS) __atomic_store_n(&qora_guard_slots[slot].used, 0, __ATOMIC_RELEASE);
}

static int qora_guard_poisoned(int slot) {
    return slot >= 0 && slot < QORA_GUARD_SLOTS && __atomic_load_n(&qora_guard_slots[slot].poisoned, __ATOMIC_ACQUIRE);
}

static int qora_guard_supported(void) { return 1; }

#else /* Windows refuses to truncate a file while it is mapped: nothing to guard */
static int qora_guard_install(void) { return 0; }
static int qora_guard_register(const void* addr, size_t len) { (void)addr; (void)len; return -3; }
static void qora_guard_unregister(int slot) { (void)slot; }
static int qora_guard_poisoned(int slot) { (void)slot; return 0; }
static int qora_guard_supported(void) { return 0; }
#endif /* QORA_GUARD_SUPPORTED */
#endif /* QORA_MAPGUARD_H */
