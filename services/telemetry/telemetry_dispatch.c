/* SPDX-License-Identifier: ISC */
/*
 * telemetry_dispatch: the messages peers send to telemetry.  There is one:
 * METRICS, from every process once a second, with its whole cumulative
 * Prometheus text; the store keeps the latest per service.  A report the
 * store refuses (a bad service name, too long, too many services) is
 * counted there and shows on the page.  Callers: telemetry.c's on_msg.
 * Never blocks; never logs per message.
 */
#include "proto.h"
#include "telemetry.h"
#include "util.h"

int
telemetry_dispatch_any(struct telemetry *t, const struct msg *m)
{
	struct metrics_report r;

	switch (m->type) {
	case MSG_METRICS:
		if (metrics_report_unpack(m, &r) == -1)
			return (DISPATCH_BAD);
		(void)telemetry_store_report(&t->store, r.service, r.text,
		                             now_mono_ms());
		break;
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
