/* SPDX-License-Identifier: ISC */
/*
 * troupectl_status: `troupectl status [--json]`.  Sends ADMIN_REQUEST op
 * "status" to the mailbox "dispatcher" and prints its answer: with --json
 * the dispatcher's JSON as is, otherwise a summary line and two tables,
 * one row per upstream (policy, limit, children it allows, runs in
 * flight, queue, last signal and its age, pause left, tier) and one per
 * bot the dispatcher knows.  Exit status as every troupectl command: 0,
 * 1 refused or an answer it cannot read, 2 usage, 3 no answer in time.
 * Never changes anything.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "conf.h"
#include "troupectl_status.h"

static const char usage_status[] =
        "usage: troupectl status [--json]\n"
        "\n"
        "What troupe-dispatcher keeps per upstream and per bot: the\n"
        "rate-limit policy, the in-flight limit, the worker children it\n"
        "allows, runs in flight and queued, the last rate-limit signal\n"
        "and its age, how long the upstream is paused, and the tier.\n"
        "  --json  the dispatcher's answer as JSON\n";

static double
num(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsNumber(v) ? v->valuedouble : 0);
}

static const char *
str(const cJSON *o, const char *k)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);

	return (cJSON_IsString(v) && v->valuestring ? v->valuestring : "-");
}

/* "http_429 2.1s ago" or "-". */
static void
signal_text(const cJSON *o, char *out, size_t n)
{
	const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "last_signal");

	if (!cJSON_IsObject(s)) {
		(void)snprintf(out, n, "-");
		return;
	}
	(void)snprintf(out, n, "%s %.1fs ago", str(s, "kind"),
	               num(s, "age_ms") / 1000);
}

static void
print_table(const cJSON *root)
{
	const cJSON *ups = cJSON_GetObjectItemCaseSensitive(root, "upstreams");
	const cJSON *bots = cJSON_GetObjectItemCaseSensitive(root, "bots");
	const cJSON *u;
	const char *tier = str(root, "tier");
	char sig[64];

	printf("tier %s%s%s  policy %s  children %.0f (ready %.0f, target "
	       "%.0f, limits allow %.0f)  in flight %.0f  queued %.0f/%.0f\n",
	       tier,
	       *str(root, "tier_cause") != '-' &&
	                       *str(root, "tier_cause") != '\0'
	               ? " "
	               : "",
	       *str(root, "tier_cause") != '-' ? str(root, "tier_cause") : "",
	       str(root, "policy"), num(root, "children"), num(root, "ready"),
	       num(root, "target"), num(root, "ceiling"),
	       num(root, "inflight"), num(root, "queue"),
	       num(root, "queue_max"));
	printf("\n%-44s %-6s %6s %8s %9s %6s %-20s %7s %4s\n", "UPSTREAM",
	       "POLICY", "LIMIT", "CHILDREN", "IN_FLIGHT", "QUEUE",
	       "LAST_SIGNAL", "PAUSED", "TIER");
	cJSON_ArrayForEach(u, ups)
	{
		signal_text(u, sig, sizeof(sig));
		printf("%-44s %-6s %6.0f %8.0f %9.0f %6.0f %-20s %6.1fs %4s\n",
		       str(u, "upstream"), str(u, "policy"), num(u, "limit"),
		       num(u, "children"), num(u, "inflight"), num(u, "queue"),
		       sig, num(u, "paused_ms") / 1000, tier);
	}
	if (cJSON_GetArraySize(ups) == 0)
		printf("(no upstream answered yet)\n");
	if (cJSON_GetArraySize(bots) == 0)
		return;
	printf("\n%-38s %-44s %6s %9s %-20s %7s\n", "BOT", "UPSTREAM", "LIMIT",
	       "IN_FLIGHT", "LAST_SIGNAL", "PAUSED");
	cJSON_ArrayForEach(u, bots)
	{
		signal_text(u, sig, sizeof(sig));
		printf("%-38s %-44s %6.0f %9.0f %-20s %6.1fs\n",
		       str(u, "bot_id"), str(u, "upstream"), num(u, "limit"),
		       num(u, "inflight"), sig, num(u, "paused_ms") / 1000);
	}
}

int
status_main(int help, int argc, char **argv, int json, double timeout,
            const char *config, int missing_ok)
{
	uint64_t status = 0;
	char *text = NULL, err[512];
	cJSON *root;
	int rc;

	if (help) {
		fputs(usage_status, stdout);
		return (0);
	}
	if (argc > 0) {
		fprintf(stderr, "troupectl: status: unexpected \"%s\"\n\n%s",
		        argv[0], usage_status);
		return (2);
	}
	/* The config only tells where mailboxes are ([ipc]). */
	if (conf_load(config, missing_ok, err, sizeof(err)) == -1) {
		fprintf(stderr, "troupectl: config: %s\n", err);
		return (1);
	}
	if ((rc = troupectl_ask("dispatcher", "status", "{}", timeout, &status,
	                        &text)) != 0) {
		free(text);
		return (rc);
	}
	if (status != 0 || text == NULL) {
		fprintf(stderr,
		        "troupectl: status: the dispatcher answered "
		        "%llu: %s\n",
		        (unsigned long long)status, text ? text : "");
		free(text);
		return (1);
	}
	if (json) {
		printf("%s\n", text);
		free(text);
		return (0);
	}
	if ((root = cJSON_Parse(text)) == NULL) {
		fprintf(stderr, "troupectl: status: not JSON: %.200s\n", text);
		free(text);
		return (1);
	}
	print_table(root);
	cJSON_Delete(root);
	free(text);
	return (0);
}
