/* SPDX-License-Identifier: ISC */
/*
 * telemetry_dispatch: the messages peers send to telemetry: METRICS, from
 * every process once a second, with its whole cumulative Prometheus text
 * (the store keeps the latest per service), and SPANS, finished trace
 * spans (telemetry_otlp.c samples and exports them).  A report the
 * store refuses (a bad service name, too long, too many services) is
 * counted there and shows on the page.  Callers: telemetry.c's on_msg.
 * Never blocks; never logs per message.
 */
#include "proto.h"
#include "telemetry.h"
#include "telemetry_otlp.h"
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
	case MSG_SPANS: {
		struct spans_report sr;

		if (spans_report_unpack(m, &sr) == -1)
			return (DISPATCH_BAD);
		telemetry_otlp_spans(sr.service, sr.spans);
		break;
	}
	default:
		return (DISPATCH_UNHANDLED);
	}
	return (DISPATCH_OK);
}
