/* SPDX-License-Identifier: ISC */
/*
 * troupe_sched.h: what troupe_sched.bpf.c (the scheduler probes) and its
 * loader in troupe-telemetry (services/telemetry/telemetry_ebpf.c) share:
 * the sizes of the maps and the value type of the two histogram maps.
 * Include it after the kernel's types (vmlinux.h in the BPF program,
 * <linux/types.h> in user space).  No code here.
 */
#ifndef TROUPE_SCHED_H
#define TROUPE_SCHED_H

/* log2 buckets of microseconds: slot 0 is [0, 2) us, slot k (k >= 1) is
 * [2^k, 2^(k+1)) us, as libbpf-tools' runqlat prints them; the last slot
 * also takes everything longer (2^26 us is 67 s). */
#define TROUPE_SCHED_SLOTS 27
/* Service ids are 1..TROUPE_SCHED_SERVICES-1; 0 means "not Troupe". */
#define TROUPE_SCHED_SERVICES 64
/* Entries of troupe_tgid (processes) and troupe_cgroup (unit cgroups). */
#define TROUPE_SCHED_PIDS 4096
#define TROUPE_SCHED_CGROUPS 256
/* Threads waiting to run or off the CPU at once (start times): unused
 * since they live in task-local storage (troupe_start). */
#define TROUPE_SCHED_THREADS 32768

/* One service's histogram, cumulative since the program was loaded. */
struct troupe_hist {
	__u64 slots[TROUPE_SCHED_SLOTS]; /* events per log2 bucket */
	__u64 count;                     /* events */
	__u64 sum_ns;                    /* their total, nanoseconds */
};

#endif
