/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_status: troupectl status.  FIRST CUT: every request is
 * answered 501; the real answer (per upstream and bot: limit, children,
 * in flight, queue, last signal, tier) replaces this file.
 */
#include "dispatcher.h"

void
dispatcher_status_admin(struct dispatcher *d, const struct msg *m,
                        const struct admin_request *req)
{
	struct msg_head h = msg_head_reply(m, NULL);
	struct admin_reply r = {.status = 501,
	                        .text = MSTR_LIT("\"not implemented\"")};
	char to[256];

	(void)req;
	if (m->reply_to.n == 0 || m->reply_to.n >= sizeof(to))
		return;
	memcpy(to, m->reply_to.p, m->reply_to.n);
	to[m->reply_to.n] = '\0';
	(void)msg_send_admin_reply(d->d_svc->ipc, to, &h, &r);
}
