/* SPDX-License-Identifier: ISC */
/*
 * edge_dispatch: the messages peers send to the edge.  A CHAT_REPLY, from
 * whichever process ends a chat (auth on a bad token, the dispatcher when
 * a worker dies, a worker on an unknown bot, storage after COMMIT), and a
 * CHAT_EVENT (server-sent events of a streaming v3 chat, from a worker or
 * storage).  They answer the waiting client through edge_http.c.
 *
 * A reply for a request nobody waits for any more (answered, past its
 * deadline, client gone, or a duplicate after a sender's restart) is
 * counted and dropped: that is normal, not an error.  Callers: edge.c's
 * peer table.  Never blocks; never logs per message.
 */
#include <stdio.h>

#include "edge.h"
#include "edge_tier.h"

static uint64_t *m_late;
static uint64_t m_sink;

void
edge_dispatch_init(struct svc *svc)
{
	char lb[96];

	snprintf(lb, sizeof(lb), "service=\"%s\"", svc->name);
	m_late = metrics_counter(
	        svc->metrics, "troupe_edge_late_replies_total",
	        "CHAT_REPLY messages for requests no longer waiting "
	        "(answered, timed out or client gone)",
	        lb);
	if (m_late == NULL)
		m_late = &m_sink;
	edge_tier_init(svc);
}

int
edge_dispatch_any(struct svc *svc, const struct msg *m)
{
	struct chat_reply r;
	struct chat_event ev;
	struct tier_state ts;

	(void)svc;
	switch (m->type) {
	case MSG_TIER_STATE:
		if (tier_state_unpack(m, &ts) == -1)
			return (DISPATCH_BAD);
		edge_tier_set(&ts, now_mono_ms());
		break;
	case MSG_CHAT_REPLY:
		if (chat_reply_unpack(m, &r) == -1)
			return (DISPATCH_BAD);
		if (edge_http_reply(m->reqid, &r) == -1)
			++*m_late;
		break;
	case MSG_CHAT_EVENT:
		if (chat_event_unpack(m, &ev) == -1)
			return (DISPATCH_BAD);
		if (edge_http_event(m->reqid, &ev) == -1)
			++*m_late;
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
