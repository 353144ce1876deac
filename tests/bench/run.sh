#!/usr/bin/env bash
# SPDX-License-Identifier: ISC
#
# The benchmark (`./troupe bench`): nginx reference, Troupe under wrk, the
# open-loop client and locust, all in one invocation on 127.0.0.1; see
# bench.py for the steps; `./troupe bench streams` runs the streaming
# scale benchmark (streams.py) instead.  Needs a built tree (TROUPE_BUILD, default
# ./build) and, for the full run, root (PostgreSQL runs as postgres).
# Bounded: about 3 minutes with the defaults.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export TROUPE_BUILD=${TROUPE_BUILD:-$here/../../build}
export PYTHONDONTWRITEBYTECODE=1
if [ "${1:-}" = soak ]; then # issue 7's soak (soak.py): 10 min by default
	shift
	exec timeout --signal=TERM --kill-after=30 \
		$((${BENCH_SOAK_S:-600} + 300)) python3 "$here/soak.py" "$@"
fi
if [ "${1:-}" = hostile ]; then # issue 7's hostile clients (hostile.py)
	shift
	exec timeout --signal=TERM --kill-after=30 600 \
		python3 "$here/hostile.py" "$@"
fi
if [ "${1:-}" = ebpf ]; then # eBPF probes on vs off (ebpf_cost.py)
	shift
	exec timeout --signal=TERM --kill-after=30 600 \
		python3 "$here/ebpf_cost.py" "$@"
fi
if [ "${1:-}" = streams ]; then # streaming scale (streams.py)
	shift
	exec timeout --signal=TERM --kill-after=30 900 \
		python3 "$here/streams.py" "$@"
fi
exec timeout --signal=TERM --kill-after=30 900 python3 "$here/bench.py" "$@"
