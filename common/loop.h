/* SPDX-License-Identifier: ISC */
/*
 * loop: the epoll event loop every service but the edge runs on (the edge
 * runs h2o's).  File descriptors, one-shot timers on a binary heap, and
 * signals through a signalfd.  Single-threaded: every function here is
 * called on the loop's thread.  It never logs and never exits.
 */
#ifndef TROUPE_LOOP_H
#define TROUPE_LOOP_H

#include <stdint.h>
#include <sys/epoll.h>

struct loop;
struct loop_timer;

typedef void (*loop_fd_cb)(struct loop *, int fd, uint32_t events, void *);
typedef void (*loop_timer_cb)(struct loop *, void *);
typedef void (*loop_signal_cb)(struct loop *, int signo, void *);
typedef void (*loop_idle_cb)(struct loop *, void *);

/* Create a loop; NULL and errno on failure. */
struct loop *loop_new(void);
void loop_free(struct loop *);

/* Watch fd for events (EPOLLIN, EPOLLOUT); one watcher per fd. */
int loop_fd_add(struct loop *, int fd, uint32_t events, loop_fd_cb, void *);
/* Change the events watched on fd. */
int loop_fd_mod(struct loop *, int fd, uint32_t events);
/* Stop watching fd; harmless if fd is unknown or already closed. */
void loop_fd_del(struct loop *, int fd);

/* A timer, stopped until loop_timer_set() arms it. */
struct loop_timer *loop_timer_new(struct loop *, loop_timer_cb, void *);
/* Fire once, ms milliseconds from now (0: on the next turn). */
void loop_timer_set(struct loop_timer *, int64_t ms);
void loop_timer_stop(struct loop_timer *);
int loop_timer_armed(const struct loop_timer *);
void loop_timer_free(struct loop_timer *);

/* Deliver signo through the loop instead of a handler (blocks it). */
int loop_signal(struct loop *, int signo, loop_signal_cb, void *);
/* Call cb at the end of every turn (batch flushes).  At most 8. */
int loop_idle(struct loop *, loop_idle_cb, void *);

/* Milliseconds on CLOCK_MONOTONIC, cached per turn. */
uint64_t loop_now(struct loop *);
/* Run until loop_break(); returns 0, or -1 if epoll fails. */
int loop_run(struct loop *);
void loop_break(struct loop *);
/* One turn: wait at most timeout_ms (0: poll) and run what is ready,
 * timers and idle callbacks included.  For embedding in another loop. */
int loop_run_once(struct loop *, int timeout_ms);
/* An fd readable whenever loop_run_once(l, 0) has work (fds or expired
 * timers: timers use a timerfd), to watch from a foreign loop (h2o). */
int loop_fd(const struct loop *);

#endif
