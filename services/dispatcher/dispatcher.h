/* SPDX-License-Identifier: ISC */
/*
 * dispatcher: the state troupe-dispatcher shares between its files.  The
 * process keeps troupe-worker children in numbered slots (Postfix's
 * master_spawn.c and master_avail.c), assigns chat runs to them and
 * answers the edge at once when a child dies under its runs.
 *
 *   dispatcher.c           main(), the peer table, config, the tick
 *   dispatcher_dispatch.c  one switch per peer (auth, worker, edge)
 *   dispatcher_run.c       the run table, the queue, assigning runs,
 *                          cancels and gone clients
 *   dispatcher_spawn.c     fork/exec, reaping, back-off, hello, retire
 *   dispatcher_scale.c     the child count (mechanism and default policy)
 *   dispatcher_admit.c     per upstream and bot rate limits (the fixed
 *                          and aimd policies of dispatcher_limit.c), the
 *                          admission of runs and their queues
 *   dispatcher_tier.c      the degradation tier (L1-L3) from measured
 *                          signals, published to the edge as TIER_STATE
 *   dispatcher_status.c    troupectl status (ADMIN_REQUEST "status")
 *
 * Everything runs on the loop thread.  Only dispatcher.c knows the svc
 * skeleton's callbacks; the other files take a struct dispatcher.
 */
#ifndef TROUPE_DISPATCHER_H
#define TROUPE_DISPATCHER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>
#include <sys/types.h>

#include "proto.h"
#include "svc.h"

#define DISPATCHER_SLOTS_MAX 256          /* highest workers_max */
#define DISPATCHER_HELLO_MS 10000         /* start to WORKER_HELLO */
#define DISPATCHER_BACKOFF_MIN_MS 100     /* first restart delay */
#define DISPATCHER_BACKOFF_MAX_MS 10000   /* doubling stops here */
#define DISPATCHER_BACKOFF_RESET_MS 30000 /* a life this long resets it */
#define DISPATCHER_STOP_KILL_MS 15000     /* stop: SIGTERM to SIGKILL */
#define DISPATCHER_RETIRE_KILL_MS 60000   /* retire: SIGTERM to SIGKILL */
#define DISPATCHER_BLOCK_MS 1000          /* no runs after a refused send */
#define DISPATCHER_SHRINK_MS 30000        /* low load this long: one less */
#define DISPATCHER_TICK_MS 250            /* policy, expiry, status */
#define DISPATCHER_STALE_MS 30000         /* a run this far past deadline */
#define DISPATCHER_SCAN_MAX                                                   \
	256 /* queued runs looked at per                                      \
	       queue and drain */
/* The code of a refusal while stopping: the run was not started, and the
 * edge sends the request again (it reaches our successor after a restart)
 * instead of answering 503 (5030) to the client. */
#define DISPATCHER_CODE_STOPPING MSG_CODE_STOPPING

/* What dispatch functions return (relayd's proc_dispatch convention). */
enum dispatch_result {
	DISPATCH_OK = 0,
	DISPATCH_BAD = -1,       /* body did not decode: dropped */
	DISPATCH_UNHANDLED = -2, /* type not expected from this peer */
};

enum child_state {
	CHILD_IDLE,     /* no process; the slot is not wanted */
	CHILD_BACKOFF,  /* no process; a restart timer runs */
	CHILD_STARTING, /* forked, no WORKER_HELLO yet */
	CHILD_READY,    /* takes runs */
	CHILD_STOPPING, /* signalled (retire, stop, hello timeout) */
};

/* Why the dispatcher signalled a child: decides how its exit is read. */
enum child_cause {
	CAUSE_NONE,
	CAUSE_RETIRE, /* scaled down: SIGTERM, drains */
	CAUSE_STOP,   /* dispatcher stopping: SIGTERM, drains */
	CAUSE_HELLO,  /* said nothing in time: SIGKILL */
	CAUSE_HUNG,   /* did not drain in time: SIGKILL */
};

struct dispatcher;
struct run;
struct admit;
TAILQ_HEAD(run_list, run);

struct child {
	struct dispatcher *c_d;
	int c_slot;
	enum child_state c_state;
	enum child_cause c_cause;
	pid_t c_pid;                /* 0: no process */
	uint32_t c_inflight;        /* runs assigned, not done */
	uint64_t c_started_ms;      /* monotonic, at fork */
	uint64_t c_backoff_ms;      /* last restart delay, 0: none yet */
	uint64_t c_blocked_until;   /* monotonic; no runs before */
	struct loop_timer *c_timer; /* hello, back-off or kill timer */
	struct run_list c_runs;
	char c_name[16]; /* "worker-<slot>" */
};

/* One chat run: assigned to a child (r_slot >= 0) or queued (-1). */
struct run {
	TAILQ_ENTRY(run) r_link; /* a child's list, or the queue */
	struct run *r_hnext;     /* hash chain by request id */
	struct run *r_cnext;     /* hash chain by chat id (v3.chat) */
	uint32_t r_hash, r_chash;
	int r_slot;
	int r_gone;             /* CLIENT_GONE seen: RUN_CANCEL sent */
	int r_up, r_bot;        /* admission keys (dispatcher_admit.c),
	                           -1: unknown */
	int r_aup, r_abot;      /* the keys counting it in flight, -1 */
	int r_tries;            /* requeues after a throttle */
	struct run_list *r_q;   /* the queue it waits in, NULL: none */
	size_t *r_qn;           /* that queue's own length, NULL: none */
	size_t *r_qk;           /* its limit key's queued runs, NULL */
	uint64_t r_deadline_ms; /* wall clock, 0: none */
	uint64_t r_since_ms;    /* monotonic: queued or assigned at */
	struct mstr r_reqid, r_trace, r_chat_id, r_body;
	char *r_edge; /* reply_to, NUL-terminated */
	char r_buf[]; /* the bytes the fields above point to */
};

struct runtab {
	struct run **rt_bucket;
	size_t rt_mask; /* buckets - 1 */
	size_t rt_count;
	struct run **rt_cbucket; /* by chat id: runs with one only */
	size_t rt_cmask;
	size_t rt_ccount;
	struct run_list rt_queue;
	size_t rt_qlen;
};

/* The default policy's memory. */
struct scale_policy {
	uint64_t sp_low_since; /* monotonic ms low load began; 0: not low */
};

/* What the policy looks at. */
struct scale_obs {
	int so_target, so_min, so_max;
	int so_pending; /* wanted slots starting or in back-off */
	int so_full;    /* no ready child can take a run */
	size_t so_queued;
	uint64_t so_inflight;
	uint32_t so_per_child; /* runs_per_worker */
};

struct dispatcher {
	struct svc *d_svc;
	struct loop *d_loop;

	/* [dispatcher] config */
	int d_min, d_max;
	uint32_t d_per_child;
	size_t d_queue_max;
	uint64_t d_queue_slack_ms; /* a queued run needs this much time */
	int d_throttle_retries;    /* requeues of a throttled run */
	char d_worker_path[4096];
	struct admit *d_adm; /* rate limits; NULL: admit everything */

	struct child d_child[DISPATCHER_SLOTS_MAX];
	int d_target;  /* slots [0, target) are wanted */
	int d_live;    /* child processes alive */
	int d_ready;   /* children in CHILD_READY */
	int d_pending; /* children starting or in back-off */
	uint64_t d_inflight;
	char **d_envp; /* the children's environment */

	struct runtab d_runs;
	struct scale_policy d_policy;
	int d_tier; /* 0 normal, 1-3: L1-L3 (dispatcher_tier.c) */
	int d_stopping, d_stop_done;
	int d_status_dirty;
	uint64_t d_status_ms;

	/* metrics (svc->metrics; NULL-safe) */
	double *m_children, *m_target, *m_inflight, *m_queue, *m_ready;
	uint64_t *m_restarts;
	uint64_t *m_exit_clean, *m_exit_error, *m_exit_signal, *m_exit_exec,
	        *m_exit_hello, *m_exit_retired, *m_exit_killed;
	uint64_t *m_rej_overload, *m_rej_deadline, *m_rej_stopping,
	        *m_rej_exited, *m_rej_limit, *m_requeued;
	uint64_t *m_drop_bad, *m_drop_unhandled, *m_drop_route, *m_drop_stale;
	uint64_t *m_assigned, *m_done, *m_grow, *m_shrink;
	uint64_t *m_cancel_worker, *m_cancel_storage, *m_cancel_refused;
	uint64_t *m_gone_cancel, *m_gone_dropped, *m_gone_unknown;
};

/* dispatcher_dispatch.c */

/* Handle an envelope from troupe-auth (CHAT_RUN). */
int dispatcher_dispatch_auth(struct dispatcher *, const struct msg *);
/* Handle an envelope from a worker child (WORKER_HELLO, RUN_DONE). */
int dispatcher_dispatch_worker(struct dispatcher *, const struct msg *);
/* Handle an envelope from an edge (CLIENT_GONE). */
int dispatcher_dispatch_edge(struct dispatcher *, const struct msg *);
/* Handle an envelope from troupe-storage (HEALTH). */
int dispatcher_dispatch_storage(struct dispatcher *, const struct msg *);
/* Handle an envelope from troupe-telemetry (SLA_SIGNAL). */
int dispatcher_dispatch_telemetry(struct dispatcher *, const struct msg *);
/* Handle an envelope from troupectl (ADMIN_REQUEST). */
int dispatcher_dispatch_tool(struct dispatcher *, const struct msg *);

/* dispatcher_run.c */

/* Set up an empty table; -1 on ENOMEM. */
int dispatcher_run_init(struct runtab *);
/* Free the table and every run in it. */
void dispatcher_run_free(struct runtab *);
/* A run with copies of the head strings, its chat id (v3.chat; empty:
 * none) and (when queued) the body; NULL on ENOMEM.  r_slot is -1. */
struct run *dispatcher_run_new(struct mstr reqid, struct mstr trace,
                               struct mstr edge, struct mstr chat_id,
                               uint64_t deadline_ms, const void *body,
                               size_t body_len);
/* Add r to the table (not to any list), and to the chat index if it has
 * a chat id; -1 on ENOMEM. */
int dispatcher_run_insert(struct runtab *, struct run *);
/* The run with this request id and reply mailbox, or NULL. */
struct run *dispatcher_run_find(const struct runtab *, struct mstr reqid,
                                struct mstr edge);
/* The run with this request id assigned to slot, or NULL. */
struct run *dispatcher_run_find_slot(const struct runtab *, struct mstr reqid,
                                     int slot);
/* The run of chat chat_id (the oldest if several), or NULL. */
struct run *dispatcher_run_find_chat(const struct runtab *,
                                     struct mstr chat_id);
/* Take r out of the table and the chat index (not out of its list). */
void dispatcher_run_remove(struct runtab *, struct run *);
/* Append r to the queue / take the oldest / take r out of it (out of
 * whichever queue it waits in). */
void dispatcher_run_enqueue(struct runtab *, struct run *);
/* Put r in queue q (length *qn, NULL: none), at its head if head. */
void dispatcher_run_enqueue_on(struct runtab *, struct run *,
                               struct run_list *q, size_t *qn, int head);
struct run *dispatcher_run_dequeue(struct runtab *);
void dispatcher_run_unqueue(struct runtab *, struct run *);
/* The ready child with the fewest runs below limit (lowest slot on a
 * tie), skipping children blocked at now; -1 if none. */
int dispatcher_run_pick(const struct child *, int n, uint32_t limit,
                        uint64_t now);
/* CHAT_RUN: assign, queue, or answer the edge 503/504. */
void dispatcher_run_chat(struct dispatcher *, const struct msg *,
                         const struct chat_request *);
/* CHAT_CANCEL: RUN_CANCEL to the child running the chat (head of the
 * cancel request, so the worker answers the canceler), else CHAT_QUERY
 * route "v3.cancel" to storage. */
void dispatcher_run_cancel(struct dispatcher *, const struct msg *,
                           const struct chat_request *);
/* CLIENT_GONE from an edge: RUN_CANCEL (no reply_to) to the child of
 * the run with that request id, or drop it from the queue unanswered. */
void dispatcher_run_gone(struct dispatcher *, const struct msg *,
                         const struct chat_request *);
/* RUN_DONE from slot: forget the run, then assign queued runs. */
void dispatcher_run_done(struct dispatcher *, int slot, const struct msg *,
                         const struct run_done *);
/* Assign queued runs while children have room. */
void dispatcher_run_drain(struct dispatcher *);
/* Child c died: answer 502 for each of its runs and forget them. */
void dispatcher_run_child_gone(struct dispatcher *, struct child *);
/* Answer 503 to every queued run (the dispatcher is stopping). */
void dispatcher_run_flush_queue(struct dispatcher *);
/* Answer 504 to queued runs past their deadline; forget assigned runs
 * long past theirs (a lost RUN_DONE must not hold a slot forever). */
void dispatcher_run_expire(struct dispatcher *);
/* Answer the edge of a request: CHAT_REPLY with an error. */
void dispatcher_run_reply(struct dispatcher *, const char *edge,
                          const struct msg_head *, uint64_t status,
                          int64_t code, const char *msg, uint64_t retry_after);

/* dispatcher_spawn.c */

/* The delay before restarting a slot whose last delay was prev_ms (0:
 * none) and whose child lived lived_ms. */
uint64_t dispatcher_spawn_backoff(uint64_t prev_ms, uint64_t lived_ms);
/* The slot of a mailbox name "worker-<k>" with k below max, or -1. */
int dispatcher_spawn_slot_of(struct mstr name, int max);
/* Fill argv (room for 8) for a child named name; config NULL or "":
 * no -c.  Returns argc. */
int dispatcher_spawn_argv(char **argv, char *path, char *config, char *name,
                          int debug);
/* A copy of env without the variables meant for this process only
 * (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*); NULL on ENOMEM.  The strings
 * are shared with env. */
char **dispatcher_spawn_env(char *const *env);
/* The default worker path: troupe-worker beside /proc/self/exe. */
int dispatcher_spawn_default_path(char *out, size_t outlen);
/* Set up slots and SIGCHLD handling; before the first fork.  0 or -1. */
int dispatcher_spawn_init(struct dispatcher *);
/* Reap every child that exited (SIGCHLD, and from the tick). */
void dispatcher_spawn_reap(struct dispatcher *);
/* Start slot's child now.  0, or -1 (fork failed: a retry is timed). */
int dispatcher_spawn_start(struct dispatcher *, struct child *);
/* The slot is no longer wanted: SIGTERM its child (drains) or cancel
 * its restart. */
void dispatcher_spawn_retire(struct dispatcher *, struct child *);
/* The slot is wanted: start it unless it runs, waits or drains. */
void dispatcher_spawn_want(struct dispatcher *, struct child *);
/* WORKER_HELLO from slot. */
void dispatcher_spawn_hello(struct dispatcher *, int slot,
                            const struct worker_hello *);
/* Stop: SIGTERM every child, SIGKILL after DISPATCHER_STOP_KILL_MS. */
void dispatcher_spawn_stop(struct dispatcher *);
/* Move a child to state (keeps the live/ready counts). */
void dispatcher_spawn_set_state(struct dispatcher *, struct child *,
                                enum child_state);

/* dispatcher_scale.c */

/* Move the child count toward target, clamped to [min, max], logging
 * cause.  Returns the new target. */
int dispatcher_scale_set(struct dispatcher *, int target, const char *cause);
/* The default policy: the target it wants given o at now (o->so_target
 * if no change); *cause says why on a change. */
int dispatcher_scale_policy(struct scale_policy *, const struct scale_obs *,
                            uint64_t now, const char **cause);
/* Every ready child is full: maybe grow by one. */
void dispatcher_scale_full(struct dispatcher *);
/* Periodic: run the policy (shrink after a quiet spell). */
void dispatcher_scale_tick(struct dispatcher *);
/* Counts changed: update gauges; status now if urgent, else soon. */
void dispatcher_scale_refresh(struct dispatcher *, int urgent);
/* Send STATUS= if it changed and a second passed (or force). */
void dispatcher_scale_status(struct dispatcher *, int force);

/* dispatcher_admit.c */

/* Read [dispatcher] policy and the limit keys (first call: set up the
 * tables, the metrics and the wake timer); 0, or -1 with err filled. */
int dispatcher_admit_init(struct dispatcher *, char *err, size_t errlen);
/* Free the tables. */
void dispatcher_admit_free(struct dispatcher *);
/* Set r's keys from its bot (known bots only): r_up, r_bot. */
void dispatcher_admit_classify(struct dispatcher *, struct run *,
                               struct mstr bot_id);
/* The queue r waits in (and its length counter, NULL for the queue of
 * runs whose upstream is not known). */
struct run_list *dispatcher_admit_queue(struct dispatcher *,
                                        const struct run *, size_t **qn);
/* The count of queued runs of r's limit key (the upstream under fixed,
 * the bot under aimd), NULL if r has none: a new run may pass queued
 * runs of other keys, never of its own. */
size_t *dispatcher_admit_keyq(struct dispatcher *, const struct run *);
/* Whether r's upstream and bot let one more run start now. */
int dispatcher_admit_ok(struct dispatcher *, const struct run *, uint64_t now);
/* ms until r's keys are no longer paused (0: not paused). */
uint64_t dispatcher_admit_wait(struct dispatcher *, const struct run *,
                               uint64_t now);
/* The i-th queue (0: runs of unknown upstream, then one per upstream)
 * with its own length counter (NULL for 0); NULL past the last. */
struct run_list *dispatcher_admit_queue_at(struct dispatcher *, int i,
                                           size_t **qn);
/* ms the runs queued before r on its key need at the key's recent rate
 * of ended runs (0: unknown or none queued). */
uint64_t dispatcher_admit_estimate(struct dispatcher *, const struct run *);
/* Ask for a drain in ms (a pause ends then). */
void dispatcher_admit_wake(struct dispatcher *, uint64_t ms);
/* r was assigned / left its child: count it in flight on its keys. */
void dispatcher_admit_start(struct dispatcher *, struct run *);
void dispatcher_admit_end(struct dispatcher *, struct run *);
/* RUN_DONE of r: learn its bot's upstream, feed the signals to the
 * policy; every change of a limit is one log line and the metrics. */
void dispatcher_admit_done(struct dispatcher *, struct run *,
                           const struct run_done *);
/* Every tick: fixed's regrowth, coalesced log lines, gauges. */
void dispatcher_admit_tick(struct dispatcher *);
/* The child count the limits allow (workers_max without limits). */
int dispatcher_admit_ceiling(const struct dispatcher *);
/* Append the JSON of every upstream's and bot's state. */
int dispatcher_admit_json(struct dispatcher *, struct buf *);

/* dispatcher_tier.c */

/* The current degradation tier: 0 normal, 1-3 for L1-L3.  In L3 the run
 * queue takes nothing: a run that cannot start at once is refused with
 * 503 and Retry-After. */
int dispatcher_tier_now(const struct dispatcher *);
/* HEALTH from troupe-storage. */
void dispatcher_tier_health(struct dispatcher *, const struct health_report *);
/* SLA_SIGNAL from troupe-telemetry. */
void dispatcher_tier_sla(struct dispatcher *, const struct sla_signal *);

/* dispatcher_status.c */

/* ADMIN_REQUEST from troupectl: op "status" is answered with the JSON of
 * every upstream's and bot's limit state; anything else 400. */
void dispatcher_status_admin(struct dispatcher *, const struct msg *,
                             const struct admin_request *);

#endif
