/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_status: troupectl status.  ADMIN_REQUEST op "status" to the
 * mailbox "dispatcher" is answered with one JSON object: the tier, the
 * children (live, ready, target, what the limits allow), runs in flight
 * and queued, and per upstream and per bot the rate-limit state of
 * dispatcher_admit.c (policy, limit, in flight, queue, last signal with
 * its age, paused until).  Any other op is answered 400.  Called from
 * dispatcher_dispatch.c; never blocks, never logs but a refused send.
 */
#include <stdio.h>
#include <string.h>

#include "dispatcher.h"
#include "dispatcher_tier.h"

static int
status_json(struct dispatcher *d, struct buf *o)
{
	const char *cause = dispatcher_tier_cause(d);
	int tier = dispatcher_tier_now(d);

	if (buf_addf(o, "{\"tier\":\"%s\",\"tier_cause\":", tier_name(tier)) ==
	            -1 ||
	    buf_add_json_str(o, cause, strlen(cause)) == -1 ||
	    buf_addf(o,
	             ",\"children\":%d,\"ready\":%d,\"target\":%d,"
	             "\"ceiling\":%d,\"workers_min\":%d,\"workers_max\":%d,"
	             "\"runs_per_worker\":%u,\"inflight\":%llu,"
	             "\"queue\":%zu,\"queue_max\":%zu,",
	             d->d_live, d->d_ready, d->d_target,
	             dispatcher_admit_ceiling(d), d->d_min, d->d_max,
	             d->d_per_child, (unsigned long long)d->d_inflight,
	             d->d_runs.rt_qlen, d->d_queue_max) == -1 ||
	    dispatcher_admit_json(d, o) == -1 || buf_adds(o, "}") == -1)
		return (-1);
	return (0);
}

void
dispatcher_status_admin(struct dispatcher *d, const struct msg *m,
                        const struct admin_request *req)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct admin_reply r = {.status = 400,
	                        .text = MSTR_LIT("\"unknown op\"")};
	struct buf o = {0};
	char to[256];

	if (m->reply_to.n == 0 || m->reply_to.n >= sizeof(to))
		return;
	memcpy(to, m->reply_to.p, m->reply_to.n);
	to[m->reply_to.n] = '\0';
	if (mstr_eq(req->op, "status")) {
		if (status_json(d, &o) == -1) {
			r.status = 500;
			r.text = MSTR_LIT("\"out of memory\"");
		} else {
			r.status = 0;
			r.text = (struct mstr){o.b, (uint32_t)o.len};
		}
	}
	if (msg_send_admin_reply(d->d_svc->ipc, to, &h, &r) == -1)
		log_warnx("%s: cannot answer %s (backlog full)", __func__, to);
	buf_free(&o);
}
