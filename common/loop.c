/* SPDX-License-Identifier: ISC */
/*
 * loop: epoll, a timerfd for the earliest timer (so the epoll fd itself is
 * readable when a timer is due, and the loop nests in h2o's), timers on a
 * binary heap, signals through one signalfd.  Callers: every service.
 * Single-threaded; never logs, never exits.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "loop.h"
#include "util.h"

struct watch {
	loop_fd_cb cb;
	void *arg;
	int used;
};

struct loop_timer {
	struct loop *loop;
	loop_timer_cb cb;
	void *arg;
	uint64_t when;
	size_t heap_idx; /* SIZE_MAX: not armed */
};

struct loop {
	int epfd, tfd, sfd;
	struct watch *w;
	size_t nw;
	struct loop_timer **heap;
	size_t nheap, capheap;
	uint64_t tfd_when; /* what the timerfd is armed for; 0: disarmed */
	uint64_t now;
	sigset_t sigs;
	struct {
		loop_signal_cb cb;
		void *arg;
	} sigcb[65];
	struct {
		loop_idle_cb cb;
		void *arg;
	} idle[8];
	int nidle;
	int broken;
	int in_turn;	/* inside loop_run_once: due timers run before it ends */
};

static void
update_now(struct loop *l)
{
	l->now = now_mono_ms();
}

struct loop *
loop_new(void)
{
	struct loop *l;

	if ((l = calloc(1, sizeof(*l))) == NULL)
		return (NULL);
	l->sfd = -1;
	if ((l->epfd = epoll_create1(EPOLL_CLOEXEC)) == -1)
		goto fail;
	if ((l->tfd = timerfd_create(CLOCK_MONOTONIC,
	    TFD_NONBLOCK | TFD_CLOEXEC)) == -1)
		goto fail;
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = l->tfd };
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->tfd, &ev) == -1)
		goto fail;
	sigemptyset(&l->sigs);
	update_now(l);
	return (l);
fail:
	if (l->epfd > 0)
		close(l->epfd);
	free(l);
	return (NULL);
}

void
loop_free(struct loop *l)
{
	if (l == NULL)
		return;
	close(l->epfd);
	close(l->tfd);
	if (l->sfd != -1)
		close(l->sfd);
	free(l->w);
	free(l->heap);
	free(l);
}

int
loop_fd(const struct loop *l)
{
	return (l->epfd);
}

uint64_t
loop_now(struct loop *l)
{
	return (l->now);
}

int
loop_fd_add(struct loop *l, int fd, uint32_t events, loop_fd_cb cb,
    void *arg)
{
	struct epoll_event ev = { .events = events, .data.fd = fd };

	if (fd < 0) {
		errno = EBADF;
		return (-1);
	}
	if ((size_t)fd >= l->nw) {
		size_t n = l->nw ? l->nw : 64;
		struct watch *w;
		while (n <= (size_t)fd)
			n *= 2;
		if ((w = realloc(l->w, n * sizeof(*w))) == NULL)
			return (-1);
		memset(w + l->nw, 0, (n - l->nw) * sizeof(*w));
		l->w = w;
		l->nw = n;
	}
	if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) == -1) {
		if (errno != EEXIST ||
		    epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev) == -1)
			return (-1);
	}
	l->w[fd].cb = cb;
	l->w[fd].arg = arg;
	l->w[fd].used = 1;
	return (0);
}

int
loop_fd_mod(struct loop *l, int fd, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.fd = fd };

	if (fd < 0 || (size_t)fd >= l->nw || !l->w[fd].used) {
		errno = ENOENT;
		return (-1);
	}
	return (epoll_ctl(l->epfd, EPOLL_CTL_MOD, fd, &ev));
}

void
loop_fd_del(struct loop *l, int fd)
{
	if (fd < 0 || (size_t)fd >= l->nw || !l->w[fd].used)
		return;
	/* The fd may already be closed (curl): EBADF/ENOENT are fine. */
	(void)epoll_ctl(l->epfd, EPOLL_CTL_DEL, fd, NULL);
	l->w[fd].used = 0;
	l->w[fd].cb = NULL;
}

/* Timer heap. */

static void
heap_swap(struct loop *l, size_t a, size_t b)
{
	struct loop_timer *t = l->heap[a];

	l->heap[a] = l->heap[b];
	l->heap[b] = t;
	l->heap[a]->heap_idx = a;
	l->heap[b]->heap_idx = b;
}

static void
heap_up(struct loop *l, size_t i)
{
	while (i > 0) {
		size_t p = (i - 1) / 2;
		if (l->heap[p]->when <= l->heap[i]->when)
			break;
		heap_swap(l, i, p);
		i = p;
	}
}

static void
heap_down(struct loop *l, size_t i)
{
	for (;;) {
		size_t c = 2 * i + 1, m = i;
		if (c < l->nheap && l->heap[c]->when < l->heap[m]->when)
			m = c;
		if (c + 1 < l->nheap && l->heap[c + 1]->when < l->heap[m]->when)
			m = c + 1;
		if (m == i)
			break;
		heap_swap(l, i, m);
		i = m;
	}
}

static void
heap_remove(struct loop *l, struct loop_timer *t)
{
	size_t i = t->heap_idx;

	if (i == SIZE_MAX)
		return;
	t->heap_idx = SIZE_MAX;
	l->nheap--;
	if (i == l->nheap)
		return;
	l->heap[i] = l->heap[l->nheap];
	l->heap[i]->heap_idx = i;
	heap_up(l, i);
	heap_down(l, l->heap[i]->heap_idx);
}

/* Keep the timerfd armed no later than the earliest timer.  timerfd_settime
 * is costly on virtual machines (it reprograms a hrtimer), so it is only
 * called when the earliest timer moves earlier than what the timerfd
 * holds: a timerfd left armed for a timer since stopped just causes one
 * spurious wake-up.  A timer due now, set inside a turn, needs no timerfd
 * at all: loop_run_once() runs due timers before it returns. */
static void
arm_tfd(struct loop *l)
{
	struct itimerspec its = { 0 };
	uint64_t when = l->nheap ? l->heap[0]->when : 0;

	if (when == 0 || (l->tfd_when != 0 && l->tfd_when <= when))
		return;
	if (l->in_turn && when <= now_mono_ms())
		return;
	l->tfd_when = when;
	{
		/* when is in ms on CLOCK_MONOTONIC; +1 ms rounds up. */
		its.it_value.tv_sec = (time_t)(when / 1000);
		its.it_value.tv_nsec = (long)(when % 1000) * 1000000L;
		if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
			its.it_value.tv_nsec = 1;
	}
	(void)timerfd_settime(l->tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

struct loop_timer *
loop_timer_new(struct loop *l, loop_timer_cb cb, void *arg)
{
	struct loop_timer *t;

	if ((t = calloc(1, sizeof(*t))) == NULL)
		return (NULL);
	t->loop = l;
	t->cb = cb;
	t->arg = arg;
	t->heap_idx = SIZE_MAX;
	return (t);
}

void
loop_timer_set(struct loop_timer *t, int64_t ms)
{
	struct loop *l = t->loop;

	heap_remove(l, t);
	if (ms < 0)
		ms = 0;
	t->when = now_mono_ms() + (uint64_t)ms;
	if (l->nheap == l->capheap) {
		size_t n = l->capheap ? l->capheap * 2 : 32;
		struct loop_timer **h = realloc(l->heap, n * sizeof(*h));
		if (h == NULL)
			abort(); /* a lost timer would wedge a request */
		l->heap = h;
		l->capheap = n;
	}
	t->heap_idx = l->nheap;
	l->heap[l->nheap++] = t;
	heap_up(l, t->heap_idx);
	arm_tfd(l);
}

void
loop_timer_stop(struct loop_timer *t)
{
	heap_remove(t->loop, t);
}

int
loop_timer_armed(const struct loop_timer *t)
{
	return (t->heap_idx != SIZE_MAX);
}

void
loop_timer_free(struct loop_timer *t)
{
	if (t == NULL)
		return;
	heap_remove(t->loop, t);
	free(t);
}

/* The timerfd fired: it is disarmed now (one-shot). */
static void
drain_tfd(struct loop *l)
{
	uint64_t n;

	while (read(l->tfd, &n, sizeof(n)) == (ssize_t)sizeof(n))
		;
	l->tfd_when = 0;
}

static void
run_timers(struct loop *l)
{
	update_now(l);
	while (l->nheap > 0 && l->heap[0]->when <= l->now) {
		struct loop_timer *t = l->heap[0];
		heap_remove(l, t);
		t->cb(l, t->arg);
	}
	arm_tfd(l);
}

/* Signals. */

static void
run_signals(struct loop *l)
{
	struct signalfd_siginfo si;

	while (read(l->sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
		int s = (int)si.ssi_signo;
		if (s > 0 && s < 65 && l->sigcb[s].cb)
			l->sigcb[s].cb(l, s, l->sigcb[s].arg);
	}
}

int
loop_signal(struct loop *l, int signo, loop_signal_cb cb, void *arg)
{
	struct epoll_event ev = { .events = EPOLLIN };
	int fd;

	if (signo <= 0 || signo >= 65) {
		errno = EINVAL;
		return (-1);
	}
	sigaddset(&l->sigs, signo);
	if (sigprocmask(SIG_BLOCK, &l->sigs, NULL) == -1)
		return (-1);
	if ((fd = signalfd(l->sfd, &l->sigs, SFD_NONBLOCK | SFD_CLOEXEC)) ==
	    -1)
		return (-1);
	if (l->sfd == -1) {
		l->sfd = fd;
		ev.data.fd = fd;
		if (epoll_ctl(l->epfd, EPOLL_CTL_ADD, fd, &ev) == -1)
			return (-1);
	}
	l->sigcb[signo].cb = cb;
	l->sigcb[signo].arg = arg;
	return (0);
}

int
loop_idle(struct loop *l, loop_idle_cb cb, void *arg)
{
	if (l->nidle == (int)nitems(l->idle)) {
		errno = ENOSPC;
		return (-1);
	}
	l->idle[l->nidle].cb = cb;
	l->idle[l->nidle].arg = arg;
	l->nidle++;
	return (0);
}

int
loop_run_once(struct loop *l, int timeout_ms)
{
	struct epoll_event evs[64];
	int n, i;

	n = epoll_wait(l->epfd, evs, (int)nitems(evs), timeout_ms);
	if (n == -1) {
		if (errno == EINTR)
			return (0);
		return (-1);
	}
	update_now(l);
	l->in_turn = 1;
	for (i = 0; i < n; i++) {
		int fd = evs[i].data.fd;
		if (fd == l->tfd)
			drain_tfd(l);
		else if (fd == l->sfd)
			run_signals(l);
		else if ((size_t)fd < l->nw && l->w[fd].used)
			l->w[fd].cb(l, fd, evs[i].events, l->w[fd].arg);
	}
	l->in_turn = 0;
	/* Timers due now, whether the timerfd fired or not. */
	if (l->nheap > 0 && l->heap[0]->when <= now_mono_ms())
		run_timers(l);
	else
		arm_tfd(l); /* re-arm after a spurious or early wake-up */
	for (i = 0; i < l->nidle; i++)
		l->idle[i].cb(l, l->idle[i].arg);
	return (n);
}

int
loop_run(struct loop *l)
{
	l->broken = 0;
	while (!l->broken)
		if (loop_run_once(l, -1) == -1)
			return (-1);
	return (0);
}

void
loop_break(struct loop *l)
{
	l->broken = 1;
}
