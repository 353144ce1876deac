# SPDX-License-Identifier: ISC
"""What the eBPF scheduler probes cost (`./troupe bench ebpf`).

One private Troupe (tests/integration/harness.py, simulator at 0 ms), the
demo bot, and wrk -t1 -c64 on POST /v1/bot/chat (chat.lua, as bench.py):
runs of BENCH_EBPF_S seconds (default 8) alternating probes off and on,
BENCH_EBPF_PAIRS pairs (default 3), starting with "off", with [dispatcher]
policy = BENCH_EBPF_POLICY (default fixed).  Between runs only
troupe-telemetry restarts, with [telemetry] ebpf = off or on, and the run
waits until GET /api/heatmap says "enabled" as asked, so both modes see
the same Redis, PostgreSQL, workers and warm caches.  Prints each run, the
medians, and the cost: (off - on) / off in %.  Target < 3 %.

Needs root (the probes load only with CAP_BPF and CAP_PERFMON; without
them the "on" runs would measure nothing, so it stops).  Everything on
127.0.0.1.  Results also go to tests/bench/results/ebpf-<timestamp>.txt.
"""
import json
import os
import resource
import statistics
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import harness as h  # noqa: E402
import bench  # noqa: E402

SECONDS = int(os.environ.get("BENCH_EBPF_S", "8"))
PAIRS = int(os.environ.get("BENCH_EBPF_PAIRS", "3"))
# A fixed admission limit: an adaptive one (aimd) reacts to the latency
# the load itself causes and would measure itself, not the probes.
POLICY = os.environ.get("BENCH_EBPF_POLICY", "fixed")
TARGET_PCT = 3.0
lines = []


def say(s=""):
    print(s, flush=True)
    lines.append(s)


TICK = os.sysconf("SC_CLK_TCK")


def troupe_cpu(t):
    """CPU seconds (user + system) of every Troupe process now."""
    pids = [t.pid(n) for n in h.SERVICES] + t.worker_pids()
    total = 0.0
    for pid in pids:
        if not pid:
            continue
        try:
            with open("/proc/%d/stat" % pid) as f:
                st = f.read().rsplit(")", 1)[1].split()
            total += (int(st[11]) + int(st[12])) / TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


def measured_run(t, url, script, env):
    """One wrk run; its result with "cpu_us": CPU microseconds per request
    of every Troupe process and wrk together (the probes run in the
    context of the tasks they observe, so their cost shows here)."""
    c0 = troupe_cpu(t)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w = bench.wrk(url, script, env, seconds=SECONDS)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c1 = troupe_cpu(t)
    n = w["rps"] * SECONDS
    cpu = (c1 - c0) + (r1.ru_utime - r0.ru_utime) + (r1.ru_stime -
                                                    r0.ru_stime)
    w["cpu_us"] = cpu / n * 1e6 if n > 0 else 0.0
    return w


def heat_enabled(t):
    url = "http://127.0.0.1:%d/api/heatmap" % t.telemetry_port
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


def set_probes(t, on):
    t.conf_over.setdefault("telemetry", {})["ebpf"] = "on" if on else "off"
    t.write_config()
    t.restart("telemetry")
    want = bool(on)
    doc = {}

    def ok():
        doc.update(heat_enabled(t))
        return doc.get("enabled") == want
    h.wait_for(ok, 15, 0.1, "telemetry with ebpf %s (last %s)" % (
        "on" if on else "off", doc))
    if on:
        # the probes register the services every 2 s: let them see all
        time.sleep(2.5)


def main():
    started = time.strftime("%Y%m%d-%H%M%S")
    if os.geteuid() != 0:
        print("ebpf_cost: needs root (the probes need CAP_BPF and "
              "CAP_PERFMON)", file=sys.stderr)
        return 2
    say("eBPF probe cost %s (%s, %d cores): wrk -t1 -c%d on /v1/bot/chat,"
        % (started, os.uname().release, os.cpu_count(), bench.CONNS))
    say("%d pairs of %d s runs, off/on alternating, medians; "
        "[dispatcher] policy = %s" % (PAIRS, SECONDS, POLICY))
    t = h.Troupe(conf={"log": {"level": "warn"},
                       "telemetry": {"ebpf": "off"},
                       "dispatcher": {"policy": POLICY}},
                 workers_min=bench.WMIN, workers_max=bench.WMAX,
                 sim_args=["--latency-ms", "0"])
    try:
        env = bench.chat_ready(t)
        if env is None:
            return 1
        url = "http://127.0.0.1:%d/v1/bot/chat" % t.edge_port
        script = os.path.join(HERE, "chat.lua")
        set_probes(t, True)
        if not heat_enabled(t)["enabled"]:
            say("the probes do not load here: nothing to compare")
            return 1
        set_probes(t, False)
        bench.wrk(url, script, env, seconds=2)          # warm-up
        res = {"off": [], "on": []}
        errors = 0
        for i in range(PAIRS):
            for mode in ("off", "on"):
                set_probes(t, mode == "on")
                w = measured_run(t, url, script, env)
                errors += w["non2xx"] + w["errors"]
                res[mode].append(w)
                say("  pair %d probes %-3s %8.0f req/s  p50 %6.2f ms  "
                    "p99 %6.2f ms  %6.1f us CPU/req" % (
                        i + 1, mode, w["rps"], w["p50"] or 0,
                        w["p99"] or 0, w["cpu_us"]))
        off = statistics.median(w["rps"] for w in res["off"])
        on = statistics.median(w["rps"] for w in res["on"])
        # paired: each "on" against the "off" just before it
        pairs = [(a["rps"] - b["rps"]) / a["rps"] * 100
                 for a, b in zip(res["off"], res["on"]) if a["rps"] > 0]
        cost = (off - on) / off * 100 if off else 0.0
        cpu_off = statistics.median(w["cpu_us"] for w in res["off"])
        cpu_on = statistics.median(w["cpu_us"] for w in res["on"])
        cpu_cost = (cpu_on - cpu_off) / cpu_off * 100 if cpu_off else 0.0
        say("")
        say("%-12s %10s %10s %12s" % ("probes", "req/s", "p99 ms",
                                      "CPU us/req"))
        for name, v, cpu in (("off", off, cpu_off), ("on", on, cpu_on)):
            say("%-12s %10.0f %10.2f %12.1f" % (
                name, v, statistics.median(w["p99"] or 0
                                           for w in res[name]), cpu))
        say("cost: %.2f %% of throughput (medians; per pair %s), "
            "%.2f %% more CPU per request; target < %.0f %%: %s" % (
                cost, ["%.1f" % p for p in pairs], cpu_cost, TARGET_PCT,
                "met" if cost < TARGET_PCT else "NOT met"))
        say("(the machine is shared: a pair's spread beyond the cost "
            "means noise; CPU per request is the steadier figure)")
        if errors:
            say("non-2xx answers or socket errors: %d" % errors)
    finally:
        t.teardown()
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results",
                               "ebpf-%s.txt" % started), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
