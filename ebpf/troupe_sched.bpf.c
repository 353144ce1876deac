// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * troupe_sched.bpf.c: run-queue latency and off-CPU time of Troupe's
 * threads, as log2 histograms of microseconds per service.
 *
 * The runqlat recipe on BTF tracepoints (kprobes and fentry are not
 * available on every kernel we run on): sched_wakeup and sched_wakeup_new
 * note when a thread became runnable; sched_switch notes it again for a
 * thread preempted while still runnable, and, when a thread gets the CPU,
 * adds (now - that time) to its service's run-queue histogram.  Off-CPU
 * time is measured from a thread's switch-out to its next switch-in,
 * whatever the reason (sleep, I/O, preemption: the run-queue wait is part
 * of it).
 *
 * A thread belongs to a service when its process (tgid) is in troupe_tgid
 * or, if use_cgroup was set before loading, its cgroup2 id is in
 * troupe_cgroup; both maps are filled by troupe-telemetry, the only
 * loader.  Every other thread costs one or two hash lookups per switch.
 * It must never keep state for threads that are not Troupe's.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "troupe_sched.h"

#define TASK_RUNNING 0

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Set by the loader before load: also look threads up by cgroup. */
const volatile bool use_cgroup = false;

/* tgid -> service id (pid mode). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TROUPE_SCHED_PIDS);
	__type(key, __u32);
	__type(value, __u32);
} troupe_tgid SEC(".maps");

/* cgroup2 id (inode of the unit's directory) -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TROUPE_SCHED_CGROUPS);
	__type(key, __u64);
	__type(value, __u32);
} troupe_cgroup SEC(".maps");

/* service id -> cumulative histogram. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TROUPE_SCHED_SERVICES);
	__type(key, __u32);
	__type(value, struct troupe_hist);
} troupe_runq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TROUPE_SCHED_SERVICES);
	__type(key, __u32);
	__type(value, struct troupe_hist);
} troupe_offcpu SEC(".maps");

/* Per thread: when it became runnable / left the CPU (ns, 0: not
 * noted).  Task-local storage, not a hash keyed by thread id: a lookup
 * is a pointer away and nothing is inserted or deleted per context
 * switch (the probes' cost is paid on every switch of a Troupe thread),
 * and an exited thread's entry goes with it. */
struct troupe_ts {
	__u64 runq;
	__u64 off;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct troupe_ts);
} troupe_start SEC(".maps");

/* task_struct::state became __state in 5.14. */
struct task_struct___o {
	volatile long int state;
} __attribute__((preserve_access_index));

struct task_struct___x {
	unsigned int __state;
} __attribute__((preserve_access_index));

static __always_inline long
task_state(void *task)
{
	struct task_struct___x *t = task;

	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___o *)task, state);
}

static __always_inline __u32
service_of(struct task_struct *t)
{
	__u32 tgid = BPF_CORE_READ(t, tgid), *id;
	__u64 cg;

	if (tgid == 0)
		return 0;
	if ((id = bpf_map_lookup_elem(&troupe_tgid, &tgid)) != NULL)
		return *id;
	if (use_cgroup) {
		cg = BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
		if ((id = bpf_map_lookup_elem(&troupe_cgroup, &cg)) != NULL)
			return *id;
	}
	return 0;
}

/* floor(log2(v)), 0 for 0 (runqlat's bits.bpf.h). */
static __always_inline __u64
log2_32(__u32 v)
{
	__u32 shift, r;

	r = (v > 0xFFFF) << 4;
	v >>= r;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u64
log2_64(__u64 v)
{
	__u32 hi = v >> 32;

	return hi ? log2_32(hi) + 32 : log2_32(v);
}

static __always_inline void
hist_add(void *map, __u32 svc, __u64 delta_ns)
{
	struct troupe_hist *h;
	__u64 slot;

	if ((h = bpf_map_lookup_elem(map, &svc)) == NULL)
		return;
	slot = log2_64(delta_ns / 1000);
	if (slot >= TROUPE_SCHED_SLOTS)
		slot = TROUPE_SCHED_SLOTS - 1;
	__sync_fetch_and_add(&h->slots[slot], 1);
	__sync_fetch_and_add(&h->count, 1);
	__sync_fetch_and_add(&h->sum_ns, delta_ns);
}

static __always_inline void
runnable(struct task_struct *p)
{
	struct troupe_ts *s;

	if (BPF_CORE_READ(p, pid) == 0 || service_of(p) == 0)
		return;
	s = bpf_task_storage_get(&troupe_start, p, 0,
	                         BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (s != NULL)
		s->runq = bpf_ktime_get_ns();
}

SEC("tp_btf/sched_wakeup")
int
BPF_PROG(troupe_wakeup, struct task_struct *p)
{
	runnable(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int
BPF_PROG(troupe_wakeup_new, struct task_struct *p)
{
	runnable(p);
	return 0;
}

SEC("tp_btf/sched_switch")
int
BPF_PROG(troupe_switch, bool preempt, struct task_struct *prev,
         struct task_struct *next)
{
	__u64 now = bpf_ktime_get_ns();
	struct troupe_ts *s;
	__u32 svc;

	if (BPF_CORE_READ(prev, pid) != 0 && service_of(prev) != 0 &&
	    (s = bpf_task_storage_get(&troupe_start, prev, 0,
	                              BPF_LOCAL_STORAGE_GET_F_CREATE)) !=
	            NULL) {
		if (task_state(prev) == TASK_RUNNING)
			s->runq = now;
		s->off = now;
	}

	if (BPF_CORE_READ(next, pid) == 0 || (svc = service_of(next)) == 0)
		return 0;
	if ((s = bpf_task_storage_get(&troupe_start, next, 0, 0)) == NULL)
		return 0;
	if (s->runq != 0 && now > s->runq)
		hist_add(&troupe_runq, svc, now - s->runq);
	if (s->off != 0 && now > s->off)
		hist_add(&troupe_offcpu, svc, now - s->off);
	s->runq = 0;
	s->off = 0;
	return 0;
}
