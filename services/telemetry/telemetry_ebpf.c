/* SPDX-License-Identifier: ISC */
/*
 * telemetry_ebpf: the scheduler probes of ebpf/troupe_sched.bpf.c, loaded
 * by troupe-telemetry (and by nothing else).
 *
 * At start: open the skeleton, say whether threads are also looked up by
 * cgroup, load, attach, and pin the four public maps under
 * [telemetry] ebpf_pin_dir (/sys/fs/bpf/troupe/{tgid,cgroup,runq,offcpu})
 * when that is a bpf filesystem we may write.  Any failure leaves the
 * probes off (or unpinned) with one log line: telemetry never fails to
 * start because of BPF, and troupe_ebpf_enabled says 0.
 *
 * Once a second (telemetry.c's sweep): every 2 s find Troupe's processes
 * and units and put them in the maps, then read the two cumulative
 * histogram maps and add the difference since the previous read to the
 * ring (telemetry_heat.c) at the current unix second.
 *
 * Which threads are Troupe's:
 * - pid mode (always): every process whose executable is
 *   troupe-{edge,auth,dispatcher,worker,storage,telemetry} and whose
 *   config file (-c) is the same as ours, so that two Troupes on one
 *   machine do not mix; the service is the part after "troupe-".  Found
 *   by reading /proc; a process that is gone leaves the map at the next
 *   scan.
 * - cgroup mode (under systemd): every directory named troupe-*.service
 *   under the cgroup that holds our own unit (or [telemetry]
 *   ebpf_cgroup_root), keyed by its cgroup id (the directory's inode);
 *   "troupe-worker@3.service" is service "worker".  A thread is looked up
 *   by process first, then by cgroup.
 *
 * Never blocks on anything but /proc and bpf(2); never logs per tick.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "svc.h"
#include "telemetry.h"

#ifdef TROUPE_HAVE_EBPF
#include <linux/types.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "troupe_sched.h"
#include "troupe_sched.skel.h"

_Static_assert(HEAT_SLOTS == TROUPE_SCHED_SLOTS, "one bucket layout");
_Static_assert(HEAT_SERVICES == TROUPE_SCHED_SERVICES, "one id range");

#define TEBPF_SCAN_EVERY 2 /* ticks between two /proc scans */
#define TEBPF_BPF_FS_MAGIC 0xcafe4a11

struct tebpf_pid {
	uint32_t tgid;
	uint32_t id;
	uint32_t gen;
};

struct tebpf_cg {
	uint64_t cgid;
	uint32_t id;
	uint32_t gen;
};

struct telemetry_ebpf {
	struct troupe_sched *skel;
	int fd_tgid, fd_cgroup, fd_hist[HEAT_NKINDS];
	char pin_dir[256];
	int pinned;
	char config[4096]; /* our resolved -c, "" for none */
	char cgroot[512];  /* where units are found, "" none */
	struct tebpf_pid pids[TROUPE_SCHED_PIDS];
	size_t npids;
	struct tebpf_cg cgs[TROUPE_SCHED_CGROUPS];
	size_t ncgs;
	uint32_t gen;
	unsigned ticks;
	struct troupe_hist prev[TROUPE_SCHED_SERVICES][HEAT_NKINDS];
	int warned_full;
};

static const char *const tebpf_kinds[] = {
        "edge", "auth", "dispatcher", "worker", "storage", "telemetry",
};

static const char *const tebpf_pins[] = {"tgid", "cgroup", "runq", "offcpu"};

static int
tebpf_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	char line[512];

	if (level == LIBBPF_DEBUG || log_getlevel() < LOG_L_DEBUG)
		return (0);
	vsnprintf(line, sizeof(line), fmt, ap);
	line[strcspn(line, "\n")] = '\0';
	log_debug("libbpf: %s", line);
	return (0);
}

/*
 * The config file a process was started with (-c PATH, -cPATH,
 * --config PATH, --config=PATH), made absolute against its cwd; "" when
 * none.  -1 if its cmdline cannot be read.
 */
static int
tebpf_config_of(const char *pid, char *out, size_t outlen)
{
	char path[64], buf[8192], cwd[2048];
	const char *arg, *val = NULL, *end;
	ssize_t n;
	int fd;

	out[0] = '\0';
	snprintf(path, sizeof(path), "/proc/%s/cmdline", pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
		return (-1);
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return (-1);
	buf[n] = '\0';
	end = buf + n;
	for (arg = buf; arg < end; arg += strlen(arg) + 1) {
		const char *next = arg + strlen(arg) + 1;

		if (strcmp(arg, "--") == 0)
			break;
		if (strcmp(arg, "-c") == 0 || strcmp(arg, "--config") == 0)
			val = next < end ? next : NULL;
		else if (strncmp(arg, "--config=", 9) == 0)
			val = arg + 9;
		else if (strncmp(arg, "-c", 2) == 0 && arg[2] != '\0' &&
		         arg[1] != '-')
			val = arg + 2;
	}
	if (val == NULL || *val == '\0')
		return (0);
	if (val[0] == '/') {
		snprintf(out, outlen, "%s", val);
		return (0);
	}
	snprintf(path, sizeof(path), "/proc/%s/cwd", pid);
	if ((n = readlink(path, cwd, sizeof(cwd) - 1)) == -1)
		return (-1);
	cwd[n] = '\0';
	snprintf(out, outlen, "%s/%s", cwd, val);
	return (0);
}

/* The service of a Troupe executable's path, or NULL. */
static const char *
tebpf_kind_of(const char *exe)
{
	const char *b = strrchr(exe, '/');
	size_t i, n;

	b = b ? b + 1 : exe;
	if (strncmp(b, "troupe-", 7) != 0)
		return (NULL);
	b += 7;
	for (i = 0; i < nitems(tebpf_kinds); i++) {
		n = strlen(tebpf_kinds[i]);
		if (strncmp(b, tebpf_kinds[i], n) == 0 &&
		    (b[n] == '\0' || strcmp(b + n, " (deleted)") == 0))
			return (tebpf_kinds[i]);
	}
	return (NULL);
}

static void
tebpf_register_pid(struct telemetry *t, uint32_t tgid, const char *svc)
{
	struct telemetry_ebpf *e = t->ebpf;
	uint32_t id;
	size_t i;
	int r;

	for (i = 0; i < e->npids; i++)
		if (e->pids[i].tgid == tgid) {
			e->pids[i].gen = e->gen;
			return;
		}
	if ((r = heat_id(&t->heat, svc)) == -1 ||
	    e->npids == nitems(e->pids)) {
		if (!e->warned_full) {
			e->warned_full = 1;
			log_warnx("%s: too many services or processes; "
			          "%s (pid %u) not followed",
			          __func__, svc, tgid);
		}
		return;
	}
	id = (uint32_t)r;
	if (bpf_map_update_elem(e->fd_tgid, &tgid, &id, BPF_ANY) != 0)
		return;
	e->pids[e->npids++] = (struct tebpf_pid){tgid, id, e->gen};
}

static void
tebpf_scan_procs(struct telemetry *t)
{
	struct telemetry_ebpf *e = t->ebpf;
	char path[300], exe[1024], cfg[4096];
	struct dirent *de;
	const char *kind;
	ssize_t n;
	DIR *d;

	if ((d = opendir("/proc")) == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] < '1' || de->d_name[0] > '9')
			continue;
		snprintf(path, sizeof(path), "/proc/%s/exe", de->d_name);
		if ((n = readlink(path, exe, sizeof(exe) - 1)) <= 0)
			continue;
		exe[n] = '\0';
		if ((kind = tebpf_kind_of(exe)) == NULL)
			continue;
		if (tebpf_config_of(de->d_name, cfg, sizeof(cfg)) == -1 ||
		    strcmp(cfg, e->config) != 0)
			continue;
		tebpf_register_pid(t, (uint32_t)strtoul(de->d_name, NULL, 10),
		                   kind);
	}
	closedir(d);
}

static void
tebpf_scan_cgroups(struct telemetry *t)
{
	struct telemetry_ebpf *e = t->ebpf;
	char name[TELEMETRY_NAME_MAX + 1], path[1024];
	struct dirent *de;
	struct stat st;
	uint64_t cgid;
	uint32_t id;
	size_t n, i;
	DIR *d;
	int r;

	if (e->cgroot[0] == '\0' || (d = opendir(e->cgroot)) == NULL)
		return;
	while ((de = readdir(d)) != NULL) {
		n = strlen(de->d_name);
		if (strncmp(de->d_name, "troupe-", 7) != 0 || n < 16 ||
		    strcmp(de->d_name + n - 8, ".service") != 0)
			continue;
		n -= 15; /* "troupe-" and ".service" */
		if (n > TELEMETRY_NAME_MAX)
			continue;
		memcpy(name, de->d_name + 7, n);
		name[n] = '\0';
		name[strcspn(name, "@")] = '\0';
		/* It becomes a label value and a JSON string: keep it plain
		 * (systemd escapes look like "\x2d"). */
		if (name[0] == '\0' ||
		    name[strspn(name,
		                "abcdefghijklmnopqrstuvwxyz"
		                "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")] !=
		            '\0')
			continue;
		snprintf(path, sizeof(path), "%s/%s", e->cgroot, de->d_name);
		if (stat(path, &st) == -1 || !S_ISDIR(st.st_mode))
			continue;
		cgid = (uint64_t)st.st_ino;
		for (i = 0; i < e->ncgs && e->cgs[i].cgid != cgid; i++)
			;
		if (i < e->ncgs) {
			e->cgs[i].gen = e->gen;
			continue;
		}
		if (e->ncgs == nitems(e->cgs) ||
		    (r = heat_id(&t->heat, name)) == -1)
			continue;
		id = (uint32_t)r;
		if (bpf_map_update_elem(e->fd_cgroup, &cgid, &id, BPF_ANY) ==
		    0)
			e->cgs[e->ncgs++] =
			        (struct tebpf_cg){cgid, id, e->gen};
	}
	closedir(d);
}

/* Forget what the latest scan did not see. */
static void
tebpf_prune(struct telemetry_ebpf *e)
{
	size_t i = 0;

	while (i < e->npids)
		if (e->pids[i].gen != e->gen) {
			(void)bpf_map_delete_elem(e->fd_tgid,
			                          &e->pids[i].tgid);
			e->pids[i] = e->pids[--e->npids];
		} else
			i++;
	i = 0;
	while (i < e->ncgs)
		if (e->cgs[i].gen != e->gen) {
			(void)bpf_map_delete_elem(e->fd_cgroup,
			                          &e->cgs[i].cgid);
			e->cgs[i] = e->cgs[--e->ncgs];
		} else
			i++;
}

static void
tebpf_scan(struct telemetry *t)
{
	t->ebpf->gen++;
	tebpf_scan_procs(t);
	tebpf_scan_cgroups(t);
	tebpf_prune(t->ebpf);
}

/* Where the cgroup2 hierarchy is mounted ("/sys/fs/cgroup" or
 * "/sys/fs/cgroup/unified"), or -1. */
static int
tebpf_cgroup2_mount(char *out, size_t outlen)
{
	char line[4096], *p, *fields[16];
	FILE *f;
	int n, rc = -1;

	if ((f = fopen("/proc/self/mountinfo", "re")) == NULL)
		return (-1);
	while (rc == -1 && fgets(line, sizeof(line), f) != NULL) {
		/* id parent maj:min root mountpoint opts ... - fstype */
		for (n = 0, p = strtok(line, " \n"); p != NULL && n < 16;
		     p = strtok(NULL, " \n"))
			if (strcmp(p, "-") == 0) {
				p = strtok(NULL, " \n");
				if (p != NULL && strcmp(p, "cgroup2") == 0 &&
				    n > 4) {
					snprintf(out, outlen, "%s", fields[4]);
					rc = 0;
				}
				break;
			} else
				fields[n++] = p;
	}
	fclose(f);
	return (rc);
}

/* The cgroup directory whose troupe-*.service children are our units:
 * the parent of our own cgroup2 when it is a troupe-*.service. */
static void
tebpf_cgroot_auto(char *out, size_t outlen)
{
	char line[2048], mnt[1024], *p, *slash;
	FILE *f;

	out[0] = '\0';
	if (tebpf_cgroup2_mount(mnt, sizeof(mnt)) == -1 ||
	    (f = fopen("/proc/self/cgroup", "re")) == NULL)
		return;
	while (fgets(line, sizeof(line), f) != NULL) {
		if (strncmp(line, "0::", 3) != 0)
			continue;
		p = line + 3;
		p[strcspn(p, "\n")] = '\0';
		if ((slash = strrchr(p, '/')) == NULL ||
		    strncmp(slash + 1, "troupe-", 7) != 0 ||
		    strlen(slash + 1) < 16 ||
		    strcmp(slash + strlen(slash) - 8, ".service") != 0)
			break;
		*slash = '\0';
		if (snprintf(out, outlen, "%s%s", mnt, p) >= (int)outlen)
			out[0] = '\0';
		break;
	}
	fclose(f);
}

static void
tebpf_pin(struct telemetry_ebpf *e, const char *dir)
{
	struct bpf_map *maps[4];
	char path[512], parent[256], *slash;
	struct statfs sfs;
	size_t i;

	if (dir[0] == '\0') {
		log_info("eBPF maps not pinned ([telemetry] ebpf_pin_dir is "
		         "empty)");
		return;
	}
	snprintf(parent, sizeof(parent), "%s", dir);
	if ((slash = strrchr(parent, '/')) != NULL && slash != parent)
		*slash = '\0';
	if (statfs(parent, &sfs) == -1 ||
	    (unsigned long)sfs.f_type != TEBPF_BPF_FS_MAGIC) {
		log_warnx("eBPF maps not pinned: %s is not a bpf filesystem "
		          "(mount -t bpf bpf %s); the probes run unpinned",
		          parent, parent);
		return;
	}
	if (mkdir(dir, 0700) == -1 && errno != EEXIST) {
		log_warn("eBPF maps not pinned: mkdir %s; the probes run "
		         "unpinned",
		         dir);
		return;
	}
	maps[0] = e->skel->maps.troupe_tgid;
	maps[1] = e->skel->maps.troupe_cgroup;
	maps[2] = e->skel->maps.troupe_runq;
	maps[3] = e->skel->maps.troupe_offcpu;
	for (i = 0; i < nitems(maps); i++) {
		snprintf(path, sizeof(path), "%s/%s", dir, tebpf_pins[i]);
		(void)unlink(path); /* a previous telemetry's */
		if (bpf_map__pin(maps[i], path) != 0) {
			log_warnx("eBPF maps not pinned: %s: %s; the probes "
			          "run unpinned",
			          path, strerror(errno));
			while (i-- > 0)
				(void)bpf_map__unpin(maps[i], NULL);
			return;
		}
	}
	snprintf(e->pin_dir, sizeof(e->pin_dir), "%s", dir);
	e->pinned = 1;
}

void
telemetry_ebpf_start(struct telemetry *t, const struct telemetry_ebpf_conf *c)
{
	struct telemetry_ebpf *e;
	const char *why;
	char self[16];
	int err;

	t->ebpf = NULL;
	if (!c->enabled) {
		snprintf(t->ebpf_reason, sizeof(t->ebpf_reason),
		         "turned off by [telemetry] ebpf");
		log_info("eBPF probes off: %s", t->ebpf_reason);
		return;
	}
	if (access("/sys/kernel/btf/vmlinux", R_OK) == -1) {
		snprintf(t->ebpf_reason, sizeof(t->ebpf_reason),
		         "no kernel BTF (/sys/kernel/btf/vmlinux: %s)",
		         strerror(errno));
		log_warnx("eBPF probes off: %s; telemetry runs without them",
		          t->ebpf_reason);
		return;
	}
	if ((e = calloc(1, sizeof(*e))) == NULL) {
		snprintf(t->ebpf_reason, sizeof(t->ebpf_reason),
		         "out of memory");
		log_warnx("eBPF probes off: out of memory");
		return;
	}
	libbpf_set_print(tebpf_libbpf_print);
	snprintf(self, sizeof(self), "%d", (int)getpid());
	(void)tebpf_config_of(self, e->config, sizeof(e->config));
	if (c->cgroup_root[0] != '\0')
		snprintf(e->cgroot, sizeof(e->cgroot), "%s", c->cgroup_root);
	else
		tebpf_cgroot_auto(e->cgroot, sizeof(e->cgroot));

	why = "open";
	if ((e->skel = troupe_sched__open()) == NULL) {
		err = errno;
		goto fail;
	}
	e->skel->rodata->use_cgroup = e->cgroot[0] != '\0';
	why = "load";
	if ((err = -troupe_sched__load(e->skel)) != 0)
		goto fail;
	why = "attach";
	if ((err = -troupe_sched__attach(e->skel)) != 0)
		goto fail;
	e->fd_tgid = bpf_map__fd(e->skel->maps.troupe_tgid);
	e->fd_cgroup = bpf_map__fd(e->skel->maps.troupe_cgroup);
	e->fd_hist[HEAT_RUNQ] = bpf_map__fd(e->skel->maps.troupe_runq);
	e->fd_hist[HEAT_OFFCPU] = bpf_map__fd(e->skel->maps.troupe_offcpu);
	t->ebpf = e;
	t->ebpf_reason[0] = '\0';
	tebpf_pin(e, c->pin_dir);
	tebpf_scan(t);
	log_info("eBPF probes on: run-queue latency and off-CPU time of "
	         "Troupe's threads, by process%s%s; maps %s%s",
	         e->cgroot[0] ? " and by unit cgroup under " : "", e->cgroot,
	         e->pinned ? "pinned under " : "not pinned",
	         e->pinned ? e->pin_dir : "");
	return;
fail:
	snprintf(t->ebpf_reason, sizeof(t->ebpf_reason), "%s: %s%s", why,
	         strerror(err),
	         err == EPERM || err == EACCES
	                 ? " (needs root, or CAP_BPF and CAP_PERFMON)"
	                 : "");
	log_warnx("eBPF probes off: %s; telemetry runs without them "
	          "(troupe_ebpf_enabled 0)",
	          t->ebpf_reason);
	troupe_sched__destroy(e->skel);
	free(e);
}

void
telemetry_ebpf_tick(struct telemetry *t)
{
	struct telemetry_ebpf *e = t->ebpf;
	struct troupe_hist cur, *prev;
	uint64_t d[HEAT_SLOTS], sum;
	int64_t sec = (int64_t)time(NULL);
	uint32_t id;
	int k, i, reset;

	heat_advance(&t->heat, sec);
	if (e == NULL)
		return;
	if (e->ticks++ % TEBPF_SCAN_EVERY == 0)
		tebpf_scan(t);
	for (id = 1; id < TROUPE_SCHED_SERVICES; id++) {
		if (t->heat.svc[id] == NULL)
			continue;
		for (k = 0; k < HEAT_NKINDS; k++) {
			if (bpf_map_lookup_elem(e->fd_hist[k], &id, &cur) != 0)
				continue;
			prev = &e->prev[id][k];
			reset = cur.count < prev->count;
			for (i = 0; i < HEAT_SLOTS; i++)
				d[i] = reset ? cur.slots[i]
				             : cur.slots[i] - prev->slots[i];
			sum = reset ? cur.sum_ns : cur.sum_ns - prev->sum_ns;
			*prev = cur;
			(void)heat_add(&t->heat, (int)id, sec,
			               (enum heat_kind)k, d, sum);
		}
	}
}

/* Is the map pinned at pin_dir/runq the one we loaded? */
static int
tebpf_still_ours(struct telemetry_ebpf *e)
{
	struct bpf_map_info a, b;
	__u32 la = sizeof(a), lb = sizeof(b);
	char path[512];
	int fd, ours;

	snprintf(path, sizeof(path), "%s/%s", e->pin_dir, tebpf_pins[2]);
	if ((fd = bpf_obj_get(path)) < 0)
		return (0);
	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	ours = bpf_obj_get_info_by_fd(fd, &a, &la) == 0 &&
	       bpf_obj_get_info_by_fd(e->fd_hist[HEAT_RUNQ], &b, &lb) == 0 &&
	       a.id == b.id;
	close(fd);
	return (ours);
}

void
telemetry_ebpf_stop(struct telemetry *t)
{
	struct telemetry_ebpf *e = t->ebpf;
	char path[512];
	size_t i;

	if (e == NULL)
		return;
	/* Unpin only what is still ours: a newer telemetry may have
	 * replaced the pins already.  The directory stays: it may be one
	 * made for us (tmpfiles.d) that we could not make again. */
	if (e->pinned && tebpf_still_ours(e)) {
		for (i = 0; i < nitems(tebpf_pins); i++) {
			snprintf(path, sizeof(path), "%s/%s", e->pin_dir,
			         tebpf_pins[i]);
			(void)unlink(path);
		}
	}
	troupe_sched__destroy(e->skel);
	free(e);
	t->ebpf = NULL;
}

#else /* !TROUPE_HAVE_EBPF */

void
telemetry_ebpf_start(struct telemetry *t, const struct telemetry_ebpf_conf *c)
{
	t->ebpf = NULL;
	snprintf(t->ebpf_reason, sizeof(t->ebpf_reason), "%s",
	         c->enabled ? "built without eBPF support"
	                    : "turned off by [telemetry] ebpf");
	log_info("eBPF probes off: %s", t->ebpf_reason);
}

void
telemetry_ebpf_tick(struct telemetry *t)
{
	heat_advance(&t->heat, (int64_t)time(NULL));
}

void
telemetry_ebpf_stop(struct telemetry *t)
{
	(void)t;
}

#endif
