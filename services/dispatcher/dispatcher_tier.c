/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_tier: the degradation tier of PRODUCT.md §6.  FIRST CUT: the
 * inputs are accepted and the tier stays 0; the real policy (signals,
 * hysteresis, TIER_STATE to the edge) replaces this file.
 */
#include "dispatcher.h"

int
dispatcher_tier_now(const struct dispatcher *d)
{
	return (d->d_tier);
}

void
dispatcher_tier_health(struct dispatcher *d, const struct health_report *h)
{
	(void)d;
	(void)h;
}

void
dispatcher_tier_sla(struct dispatcher *d, const struct sla_signal *s)
{
	(void)d;
	(void)s;
}
