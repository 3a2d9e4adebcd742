"""cffi build script of the fdatasync thread used by :class:`vfu_server.block.file.FileBackend`.

Why C: a Python thread needs the GIL back after ``fdatasync(2)`` returns, to record the result and
write the eventfd that wakes the event loop. While a queue polls guest memory the event loop
holds the GIL except for a few microseconds per scheduler pass, so the thread's wake-up waits for
one of those gaps (and loses races for them): a 4 KiB write plus flush cost 950 us through the
server with polling on against 670 us with polling off (``bench.devices``, docs/performance.md,
"Tenth session"). A thread of C never takes the GIL: it waits on one eventfd, calls
``fdatasync``, stores the errno and writes a second eventfd, which the loop sees at its next
``epoll_wait`` whether it polls or sleeps.

``python -m vfu_server.block._syncer_build [DIR]`` builds it ahead of time (``./run`` does);
without a compiler the backend keeps its Python thread.
"""

from __future__ import annotations

import sys

from .. import cbuild

MODULE_NAME = "_vfu_syncer"

CDEF = """
struct vfu_syncer {
    int go_fd;
    int done_fd;
    int fd;
    int error;
    ...;
};

int vfu_syncer_start(struct vfu_syncer *s, int go_fd, int done_fd);
int vfu_syncer_stop(struct vfu_syncer *s);
"""

SOURCE = r"""
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <unistd.h>

struct vfu_syncer {
    int go_fd;      /* blocking eventfd: the loop writes 1 to ask for one fdatasync */
    int done_fd;    /* the loop's eventfd: the thread writes 1 when it answered */
    int fd;         /* the file to sync; < 0 asks the thread to end */
    int error;      /* errno of the last fdatasync, 0 when it succeeded */
    pthread_t thread;
};

static void *vfu_syncer_run(void *arg)
{
    struct vfu_syncer *s = arg;
    uint64_t one = 1, got;

    for (;;) {
        if (read(s->go_fd, &got, sizeof got) != (ssize_t)sizeof got) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return NULL;
        }
        /* The eventfd read orders this after the loop's store of fd. */
        int fd = __atomic_load_n(&s->fd, __ATOMIC_ACQUIRE);
        if (fd < 0)
            return NULL;
        int err = fdatasync(fd) == 0 ? 0 : errno;
        __atomic_store_n(&s->error, err, __ATOMIC_RELEASE);
        while (write(s->done_fd, &one, sizeof one) < 0 && errno == EINTR)
            ;
    }
}

/* Start the thread with every signal blocked, so that signals keep going to the interpreter's
   main thread. Returns 0 or an errno. */
int vfu_syncer_start(struct vfu_syncer *s, int go_fd, int done_fd)
{
    sigset_t all, old;
    int rc;

    s->go_fd = go_fd;
    s->done_fd = done_fd;
    s->fd = -1;
    s->error = 0;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&s->thread, NULL, vfu_syncer_run, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* Ask the thread to end and wait for it (not while an fdatasync is asked for). */
int vfu_syncer_stop(struct vfu_syncer *s)
{
    uint64_t one = 1;

    __atomic_store_n(&s->fd, -1, __ATOMIC_RELEASE);
    while (write(s->go_fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
    return pthread_join(s->thread, NULL);
}
"""


HELPER = cbuild.Helper("syncer", MODULE_NAME, CDEF, SOURCE)


if __name__ == "__main__":
    HELPER.main(sys.argv[1:])
