/* SPDX-License-Identifier: ISC */
/*
 * worker: what the files of troupe-worker share.  worker.c owns the
 * process (main, config, metrics, stop), worker_dispatch.c turns
 * envelopes into calls, worker_run.c runs the chats, worker_upstream.c
 * talks HTTP to the LLM upstreams.  Nothing here is used outside
 * services/worker and its unit tests.
 */
#ifndef TROUPE_WORKER_H
#define TROUPE_WORKER_H

#include <sys/types.h>

#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "svc.h"
#include "worker_upstream.h"

#define WORKER_CHAT_ID_LEN 19        /* decimal digits, as Coze's ids */
#define WORKER_CONV_ID_LEN 37        /* "conv_" and 32 hex digits */
#define WORKER_PEER_MAX 128          /* longest mailbox name we answer to */
#define WORKER_EDGES_MAX 8           /* edge names remembered for the drain */
#define WORKER_PAUSES 64             /* upstream and bot pairs held back */
#define WORKER_PAUSE_KEY 160         /* "<url> <bot>", longer: not held */
#define WORKER_PAUSE_DEFAULT_MS 1000 /* a throttle without Retry-After */

enum dispatch_rc { DISPATCH_OK, DISPATCH_BAD, DISPATCH_UNHANDLED };

/* The state behind chat ids: the last millisecond used and a counter
 * within it. */
struct chat_idgen {
	uint64_t last_ms;
	unsigned seq;
};

struct run;

/* An upstream (and bot) this worker sends nothing to before until: it
 * answered a throttle with that Retry-After (monotonic ms). */
struct worker_pause {
	uint64_t until;
	char key[WORKER_PAUSE_KEY];
};

struct worker {
	struct svc svc; /* first: the svc's arg and &worker agree */
	unsigned slot;
	pid_t ppid;   /* the dispatcher that started us */
	int stopping; /* no new runs; stop when the last ends */

	struct upstream *up;
	struct upstream_conf upconf;
	int64_t run_timeout_ms;    /* deadline of a run that came without */
	int64_t first_event_ms;    /* v3: first content by then, 0: none */
	int64_t total_ms;          /* v3: the whole answer by then, 0: none */
	int64_t plugin_timeout_ms; /* a plugin's when it names none */
	unsigned max_tool_rounds;  /* v3: tool rounds in one chat */

	/* Runs by request id: a chained hash table. */
	struct run **buckets;
	size_t nbuckets;
	size_t nruns;

	struct chat_idgen idgen;
	char edges[WORKER_EDGES_MAX][WORKER_PEER_MAX];
	size_t nedges;

	struct worker_pause pauses[WORKER_PAUSES];

	struct loop_timer *ppid_timer;
	struct loop_timer *drain_timer;
	uint64_t drain_start_ms;
	uint64_t warn_ms; /* last rate-limited warning */

	struct metrics *metrics;
	double *m_inflight;
	double *m_queued;
	struct histo *m_upstream;
	uint64_t *m_dup_assign;
	uint64_t *m_unknown_ctx;
	uint64_t *m_bad_msg;
	uint64_t *m_send_refused;
	uint64_t *m_canceled;    /* v3 runs canceled */
	uint64_t *m_cancel_late; /* RUN_CANCEL for a run we no longer have */
	uint64_t *m_tool_ok;     /* tool calls with the plugin's answer */
	uint64_t *m_tool_err;    /* tool calls with an error result */
	struct {
		uint64_t status;
		uint64_t *count;
	} m_status[16];
	size_t nm_status;
};

/* worker.c */
/* Count one finished run by the status its client got. */
void worker_count_status(struct worker *, uint64_t status);
/* A run ended: when stopping and none is left, finish the stop. */
void worker_stop_check(struct worker *);
/* Whether a rate-limited warning may be logged now (one a second). */
int worker_warn_ok(struct worker *);
/* Remember an edge's mailbox name, so the stop waits for its backlog. */
void worker_note_edge(struct worker *, const char *);

/* worker_dispatch.c */
/* The svc's on_msg: route an envelope to its peer's dispatch. */
void worker_dispatch(void *arg, const struct msg *);
int worker_dispatch_dispatcher(struct worker *, const struct msg *);
int worker_dispatch_storage(struct worker *, const struct msg *);

/* worker_run.c */
/* Start a run (RUN_ASSIGN); duplicates of a running one are ignored. */
void worker_run_assign(struct worker *, const struct msg *,
                       const struct chat_request *);
/* Answer a RUN_ASSIGN that did not decode: 500 to its edge, RUN_DONE. */
void worker_run_reject(struct worker *, const struct msg *);
/* Cancel a v3 run (RUN_CANCEL): abort its upstream call, store it as
 * canceled and answer reply_to, if any, with the chat (409 if the run is
 * no longer here). */
void worker_run_cancel(struct worker *, const struct msg *,
                       const struct chat_request *);
/* Continue a run with storage's CTX_REPLY (NULL: it did not decode). */
void worker_run_ctx(struct worker *, const struct msg *,
                    const struct ctx_reply *);
/* Set up / tear down the run table (teardown answers nobody). */
int worker_run_init(struct worker *);
void worker_run_free_all(struct worker *);

/* Write the next chat id for slot at wall time now_ms: 19 digits, the
 * 13-digit millisecond, the slot modulo 1000 and a 3-digit counter,
 * NUL-terminated.  Never goes back in time within one generator. */
void worker_run_chat_id(struct chat_idgen *, uint64_t now_ms, unsigned slot,
                        char out[WORKER_CHAT_ID_LEN + 1]);
/* Write the chat id of the request reqid: 19 decimal digits, always the
 * same for the same request id, so a run executed twice stores one row. */
void worker_run_chat_id_of(struct mstr reqid,
                           char out[WORKER_CHAT_ID_LEN + 1]);
/* Write a new conversation id "conv_<32 hex>", NUL-terminated; -1 if the
 * system has no randomness to give. */
int worker_run_conv_id(char out[WORKER_CONV_ID_LEN + 1]);
/* Merge the signals of one upstream answer into a run's: the strongest
 * wins (throttled > an exhausted quota > a remaining count > nothing);
 * dialects seen add up, waits take the longest, counts the lowest. */
void worker_run_signal_merge(struct rl_signal *acc, const struct rl_signal *);
/* Hold back url for bot until (monotonic ms); a full table forgets the
 * pause that ends first. */
void worker_run_pause_set(struct worker *, const char *url, struct mstr bot,
                          uint64_t until);
/* ms until url may be called for bot (0: now). */
uint64_t worker_run_pause_left(const struct worker *, const char *url,
                               struct mstr bot, uint64_t now);
/* Append the "data" JSON of a successful chat. */
int worker_run_reply_json(struct buf *, const char *chat_id,
                          struct mstr conversation_id, struct mstr bot_id,
                          const char *answer, size_t answer_len,
                          uint64_t prompt_tokens, uint64_t completion_tokens);

#endif
