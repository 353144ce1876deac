/* SPDX-License-Identifier: ISC */
/*
 * dispatcher_spawn: troupe-worker children, as Postfix's master keeps its
 * services (master_spawn.c, master_avail.c).  A slot k runs at most one
 * child, started as
 *
 *	<worker_path> -c <config> -n worker-<k> [-d]
 *
 * It counts as ready after its WORKER_HELLO{pid, slot}; one that says
 * nothing for DISPATCHER_HELLO_MS is killed.  SIGCHLD (through the loop's
 * signalfd) reaps; a slot whose child exited unasked is restarted after
 * a per-slot back-off (100 ms doubling to 10 s, back to 100 ms once a
 * child lived 30 s), so a crash loop never becomes a fork loop.  Retiring
 * a slot sends SIGTERM: the worker drains its runs and exits.
 *
 * The parent has nng's threads, so between fork() and execve() the child
 * makes only async-signal-safe calls: it asks for SIGTERM when the parent
 * dies, resets every signal disposition and the signal mask (the loop
 * blocks what it reads through its signalfd, and blocked masks survive
 * exec), closes every fd above 2 (nng's sockets, pipes, epoll fds) and
 * execs.  It stays in the dispatcher's process group, so a ^C at a
 * terminal reaches every worker as it does the dispatcher (both drain),
 * and systemd's KillMode=control-group needs no group either.  Variables
 * meant for the dispatcher only (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) are
 * removed from the children's environment: a worker's READY=1 must not
 * speak for the unit.
 *
 * DIAGNOSTICS: every exit is logged with its status or signal (log_info
 * when asked for, log_warnx otherwise); a failed fork is logged and
 * retried after the back-off; a failed exec shows as exit status 127 and
 * a line on stderr from the child.  Never exits.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dispatcher.h"

extern char **environ;

/* Prepared by the parent so the child need not call anything unsafe. */
struct spawn_ctx {
	char **argv;
	char **envp;
	pid_t parent;
	int maxfd; /* close() loop bound if close_range() is missing */
	struct sigaction dfl;
	sigset_t none;
	char err[320];
	size_t errlen;
};

static void spawn_timer(struct loop *, void *);

uint64_t
dispatcher_spawn_backoff(uint64_t prev_ms, uint64_t lived_ms)
{
	if (prev_ms == 0 || lived_ms >= DISPATCHER_BACKOFF_RESET_MS)
		return (DISPATCHER_BACKOFF_MIN_MS);
	if (prev_ms >= DISPATCHER_BACKOFF_MAX_MS / 2)
		return (DISPATCHER_BACKOFF_MAX_MS);
	return (prev_ms * 2);
}

int
dispatcher_spawn_slot_of(struct mstr name, int max)
{
	static const char pfx[] = "worker-";
	const size_t np = sizeof(pfx) - 1;
	int k = 0;

	if (name.n <= np || name.n > np + 3 || memcmp(name.p, pfx, np) != 0)
		return (-1);
	if (name.p[np] == '0' && name.n > np + 1)
		return (-1); /* "worker-01" is not slot 1's name */
	for (uint32_t i = np; i < name.n; i++) {
		if (name.p[i] < '0' || name.p[i] > '9')
			return (-1);
		k = k * 10 + (name.p[i] - '0');
	}
	return (k < max ? k : -1);
}

int
dispatcher_spawn_argv(char **argv, char *path, char *config, char *name,
                      int debug)
{
	int n = 0;

	argv[n++] = path;
	if (config != NULL && *config != '\0') {
		argv[n++] = "-c";
		argv[n++] = config;
	}
	argv[n++] = "-n";
	argv[n++] = name;
	if (debug)
		argv[n++] = "-d";
	argv[n] = NULL;
	return (n);
}

char **
dispatcher_spawn_env(char *const *env)
{
	static const char *const drop[] = {
	        "NOTIFY_SOCKET=", "WATCHDOG_PID=", "WATCHDOG_USEC=",
	        "LISTEN_PID=",    "LISTEN_FDS=",   "LISTEN_FDNAMES="};
	size_t n = 0, k = 0, i;
	char **out;

	while (env != NULL && env[n] != NULL)
		n++;
	if ((out = calloc(n + 1, sizeof(*out))) == NULL)
		return (NULL);
	for (size_t j = 0; j < n; j++) {
		for (i = 0; i < nitems(drop); i++)
			if (strncmp(env[j], drop[i], strlen(drop[i])) == 0)
				break;
		if (i == nitems(drop))
			out[k++] = env[j];
	}
	out[k] = NULL;
	return (out);
}

int
dispatcher_spawn_default_path(char *out, size_t outlen)
{
	static const char base[] = "/troupe-worker";
	char exe[4096], *slash;
	ssize_t n;

	if ((n = readlink("/proc/self/exe", exe, sizeof(exe) - 1)) == -1)
		return (-1);
	exe[n] = '\0';
	if ((slash = strrchr(exe, '/')) == NULL) {
		errno = ENOENT;
		return (-1);
	}
	*slash = '\0';
	if ((size_t)snprintf(out, outlen, "%s%s", exe, base) >= outlen) {
		errno = ENAMETOOLONG;
		return (-1);
	}
	return (0);
}

static int
spawn_alive(enum child_state s)
{
	return (s == CHILD_STARTING || s == CHILD_READY ||
	        s == CHILD_STOPPING);
}

void
dispatcher_spawn_set_state(struct dispatcher *d, struct child *c,
                           enum child_state s)
{
	enum child_state old = c->c_state;

	if (spawn_alive(old) && !spawn_alive(s))
		d->d_live--;
	else if (!spawn_alive(old) && spawn_alive(s))
		d->d_live++;
	if (old == CHILD_READY)
		d->d_ready--;
	if (s == CHILD_READY)
		d->d_ready++;
	if (old == CHILD_STARTING || old == CHILD_BACKOFF)
		d->d_pending--;
	if (s == CHILD_STARTING || s == CHILD_BACKOFF)
		d->d_pending++;
	c->c_state = s;
}

static void
spawn_sigchld(struct loop *l, int signo, void *arg)
{
	struct dispatcher *d = arg;

	(void)l;
	(void)signo;
	/* A RUN_DONE the child sent just before it died may wait in the
	 * mailbox: take it first, so that run is not answered 502. */
	(void)ipc_process(d->d_svc->ipc);
	dispatcher_spawn_reap(d);
}

int
dispatcher_spawn_init(struct dispatcher *d)
{
	for (int k = 0; k < DISPATCHER_SLOTS_MAX; k++) {
		struct child *c = &d->d_child[k];

		c->c_d = d;
		c->c_slot = k;
		c->c_state = CHILD_IDLE;
		TAILQ_INIT(&c->c_runs);
		(void)snprintf(c->c_name, sizeof(c->c_name), "worker-%d", k);
		if ((c->c_timer = loop_timer_new(d->d_loop, spawn_timer, c)) ==
		    NULL)
			return (-1);
	}
	if ((d->d_envp = dispatcher_spawn_env(environ)) == NULL)
		return (-1);
	return (loop_signal(d->d_loop, SIGCHLD, spawn_sigchld, d));
}

/* The child, between fork() and execve(): async-signal-safe calls only
 * (another thread of the parent may have held malloc's or nng's locks). */
static void __attribute__((noreturn)) spawn_exec(const struct spawn_ctx *x)
{
	if (prctl(PR_SET_PDEATHSIG, SIGTERM) == -1 || getppid() != x->parent)
		_exit(127); /* the parent is already gone */
	for (int s = 1; s < NSIG; s++)
		if (s != SIGKILL && s != SIGSTOP)
			(void)sigaction(s, &x->dfl, NULL); /* 32, 33: EINVAL */
	(void)sigprocmask(SIG_SETMASK, &x->none, NULL);
	if (close_range(3, ~0U, 0) == -1)
		for (int fd = 3; fd < x->maxfd; fd++)
			(void)close(fd);
	(void)execve(x->argv[0], x->argv, x->envp);
	(void)write(STDERR_FILENO, x->err, x->errlen);
	_exit(127);
}

static void
spawn_backoff(struct dispatcher *d, struct child *c, uint64_t lived_ms)
{
	c->c_backoff_ms = dispatcher_spawn_backoff(c->c_backoff_ms, lived_ms);
	dispatcher_spawn_set_state(d, c, CHILD_BACKOFF);
	loop_timer_set(c->c_timer, (int64_t)c->c_backoff_ms);
	log_info("%s: restarting %s in %llu ms", __func__, c->c_name,
	         (unsigned long long)c->c_backoff_ms);
}

int
dispatcher_spawn_start(struct dispatcher *d, struct child *c)
{
	struct spawn_ctx x;
	struct rlimit rl;
	char cfg[4096], *argv[8];
	const char *cp = d->d_svc->config_path;
	int n;
	pid_t pid;

	/* The default config may be missing (svc then runs on defaults and
	 * the environment); an explicit -c for a missing file is fatal in
	 * the worker, so name it only when it is there. */
	if (cp == NULL || access(cp, F_OK) == -1)
		cp = "";
	if (strlen(cp) >= sizeof(cfg)) {
		log_warnx("%s: config path too long", __func__);
		return (-1);
	}
	(void)snprintf(cfg, sizeof(cfg), "%s", cp);
	dispatcher_spawn_argv(argv, d->d_worker_path, cfg, c->c_name,
	                      log_getlevel() >= LOG_L_DEBUG);
	memset(&x, 0, sizeof(x));
	x.argv = argv;
	x.envp = d->d_envp;
	x.parent = getpid();
	x.maxfd = 65536;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 65536)
		x.maxfd = (int)rl.rlim_cur;
	x.dfl.sa_handler = SIG_DFL;
	sigemptyset(&x.dfl.sa_mask);
	sigemptyset(&x.none);
	n = snprintf(x.err, sizeof(x.err),
	             "troupe-dispatcher: %s: cannot execute %s\n", c->c_name,
	             d->d_worker_path);
	x.errlen = n < 0                        ? 0
	           : (size_t)n >= sizeof(x.err) ? sizeof(x.err) - 1
	                                        : (size_t)n;

	if ((pid = fork()) == -1) {
		log_warn("%s: fork %s", __func__, c->c_name);
		spawn_backoff(d, c, 0);
		return (-1);
	}
	if (pid == 0)
		spawn_exec(&x);

	c->c_pid = pid;
	c->c_cause = CAUSE_NONE;
	c->c_started_ms = now_mono_ms();
	c->c_blocked_until = 0;
	dispatcher_spawn_set_state(d, c, CHILD_STARTING);
	loop_timer_set(c->c_timer, DISPATCHER_HELLO_MS);
	log_info("%s: %s started (pid %d)", __func__, c->c_name, (int)pid);
	dispatcher_scale_refresh(d, 1);
	return (0);
}

/* Never kill(0) or kill(-1): that would be our own group or everyone. */
static void
spawn_kill(struct child *c, int sig)
{
	if (c->c_pid > 0 && kill(c->c_pid, sig) == -1 && errno != ESRCH)
		log_warn("%s: kill %s (pid %d)", __func__, c->c_name,
		         (int)c->c_pid);
}

static void
spawn_check_stopped(struct dispatcher *d)
{
	if (!d->d_stopping || d->d_live > 0 || d->d_stop_done)
		return;
	d->d_stop_done = 1;
	log_info("%s: every worker has exited", __func__);
	svc_stop_done(d->d_svc);
}

static void
spawn_timer(struct loop *l, void *arg)
{
	struct child *c = arg;
	struct dispatcher *d = c->c_d;

	(void)l;
	switch (c->c_state) {
	case CHILD_BACKOFF:
		if (d->d_stopping || c->c_slot >= d->d_target) {
			dispatcher_spawn_set_state(d, c, CHILD_IDLE);
			break;
		}
		if (d->m_restarts)
			(*d->m_restarts)++;
		(void)dispatcher_spawn_start(d, c);
		break;
	case CHILD_STARTING:
		log_warnx("%s: %s (pid %d) sent no WORKER_HELLO in %d s: "
		          "killing it",
		          __func__, c->c_name, (int)c->c_pid,
		          DISPATCHER_HELLO_MS / 1000);
		c->c_cause = CAUSE_HELLO;
		dispatcher_spawn_set_state(d, c, CHILD_STOPPING);
		spawn_kill(c, SIGKILL);
		break;
	case CHILD_STOPPING:
		log_warnx(
		        "%s: %s (pid %d) still runs %llu s after SIGTERM "
		        "with %u runs: killing it",
		        __func__, c->c_name, (int)c->c_pid,
		        (unsigned long long)(c->c_cause == CAUSE_STOP
		                                     ? DISPATCHER_STOP_KILL_MS /
		                                               1000
		                                     : DISPATCHER_RETIRE_KILL_MS /
		                                               1000),
		        c->c_inflight);
		c->c_cause = CAUSE_HUNG;
		spawn_kill(c, SIGKILL);
		break;
	default:
		break;
	}
}

/* c's process is gone (wait status st): say why, answer its runs, and
 * restart the slot if it is still wanted. */
static void
spawn_exited(struct dispatcher *d, struct child *c, int st)
{
	uint64_t lived = now_mono_ms() - c->c_started_ms, *ctr;
	const char *reason;
	char how[128];
	int asked = 0;

	if (WIFSIGNALED(st))
		(void)snprintf(how, sizeof(how), "killed by signal %d (%s)%s",
		               WTERMSIG(st), strsignal(WTERMSIG(st)),
		               WCOREDUMP(st) ? ", core dumped" : "");
	else
		(void)snprintf(how, sizeof(how), "exited with status %d",
		               WEXITSTATUS(st));

	if ((c->c_cause == CAUSE_RETIRE || c->c_cause == CAUSE_STOP) &&
	    ((WIFEXITED(st) && WEXITSTATUS(st) == 0) ||
	     (WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM))) {
		reason = "retired";
		ctr = d->m_exit_retired;
		asked = 1;
	} else if (c->c_cause == CAUSE_HELLO) {
		reason = "hello_timeout";
		ctr = d->m_exit_hello;
	} else if (c->c_cause == CAUSE_HUNG) {
		reason = "killed";
		ctr = d->m_exit_killed;
	} else if (WIFEXITED(st) && WEXITSTATUS(st) == 127 &&
	           c->c_state == CHILD_STARTING) {
		reason = "exec_failed";
		ctr = d->m_exit_exec;
	} else if (WIFEXITED(st) && WEXITSTATUS(st) == 0) {
		reason = "clean";
		ctr = d->m_exit_clean;
	} else if (WIFEXITED(st)) {
		reason = "error";
		ctr = d->m_exit_error;
	} else {
		reason = "signal";
		ctr = d->m_exit_signal;
	}
	if (ctr)
		(*ctr)++;
	if (asked)
		log_info("%s: %s (pid %d) %s after %llu.%01llu s (%s)",
		         __func__, c->c_name, (int)c->c_pid, how,
		         (unsigned long long)(lived / 1000),
		         (unsigned long long)(lived % 1000 / 100), reason);
	else
		log_warnx("%s: %s (pid %d) %s after %llu.%01llu s (%s)",
		          __func__, c->c_name, (int)c->c_pid, how,
		          (unsigned long long)(lived / 1000),
		          (unsigned long long)(lived % 1000 / 100), reason);

	loop_timer_stop(c->c_timer);
	c->c_pid = 0;
	c->c_cause = CAUSE_NONE;
	c->c_blocked_until = 0;
	dispatcher_spawn_set_state(d, c, CHILD_IDLE);
	dispatcher_run_child_gone(d, c);
	/* What was queued for the dead child must not reach the next one
	 * under the same mailbox name: those runs were just answered. */
	ipc_forget(d->d_svc->ipc, c->c_name);

	if (d->d_stopping) {
		spawn_check_stopped(d);
	} else if (c->c_slot < d->d_target) {
		if (asked)
			(void)dispatcher_spawn_start(d, c);
		else
			spawn_backoff(d, c, lived);
	}
	dispatcher_scale_refresh(d, 1);
}

void
dispatcher_spawn_reap(struct dispatcher *d)
{
	struct child *c;
	pid_t pid;
	int st, k;

	for (;;) {
		if ((pid = waitpid(-1, &st, WNOHANG)) == 0)
			break;
		if (pid == -1) {
			if (errno == EINTR)
				continue;
			if (errno != ECHILD)
				log_warn("%s: waitpid", __func__);
			break;
		}
		for (k = 0, c = NULL; k < DISPATCHER_SLOTS_MAX; k++)
			if (d->d_child[k].c_pid == pid) {
				c = &d->d_child[k];
				break;
			}
		if (c == NULL) {
			log_debug("%s: reaped pid %d, not a worker", __func__,
			          (int)pid);
			continue;
		}
		spawn_exited(d, c, st);
	}
}

void
dispatcher_spawn_retire(struct dispatcher *d, struct child *c)
{
	switch (c->c_state) {
	case CHILD_BACKOFF:
		loop_timer_stop(c->c_timer);
		dispatcher_spawn_set_state(d, c, CHILD_IDLE);
		break;
	case CHILD_STARTING:
	case CHILD_READY:
		log_info("%s: retiring %s (pid %d, %u runs in flight)",
		         __func__, c->c_name, (int)c->c_pid, c->c_inflight);
		c->c_cause = CAUSE_RETIRE;
		dispatcher_spawn_set_state(d, c, CHILD_STOPPING);
		loop_timer_set(c->c_timer, DISPATCHER_RETIRE_KILL_MS);
		spawn_kill(c, SIGTERM);
		break;
	case CHILD_IDLE:
	case CHILD_STOPPING:
		break;
	}
}

void
dispatcher_spawn_want(struct dispatcher *d, struct child *c)
{
	/* A draining child is restarted when it exits (spawn_exited). */
	if (c->c_state == CHILD_IDLE)
		(void)dispatcher_spawn_start(d, c);
}

static const char *
spawn_state_name(enum child_state s)
{
	static const char *const names[] = {"idle", "back-off", "starting",
	                                    "ready", "stopping"};

	return ((size_t)s < nitems(names) ? names[s] : "?");
}

void
dispatcher_spawn_hello(struct dispatcher *d, int slot,
                       const struct worker_hello *h)
{
	struct child *c = &d->d_child[slot];
	int ours = h->pid == (uint64_t)c->c_pid && h->slot == (uint64_t)slot;

	if (ours && c->c_state == CHILD_STOPPING) {
		/* Retired or stopped before it said hello: a benign race. */
		log_debug("%s: late WORKER_HELLO from %s (pid %d), stopping",
		          __func__, c->c_name, (int)c->c_pid);
		return;
	}
	if (!ours || c->c_state != CHILD_STARTING) {
		/* A worker nobody here started, or a duplicate. */
		log_warnx("%s: WORKER_HELLO from %s (pid %llu, slot %llu) "
		          "does not match pid %d (%s): ignored",
		          __func__, c->c_name, (unsigned long long)h->pid,
		          (unsigned long long)h->slot, (int)c->c_pid,
		          spawn_state_name(c->c_state));
		return;
	}
	loop_timer_stop(c->c_timer);
	dispatcher_spawn_set_state(d, c, CHILD_READY);
	log_info("%s: %s (pid %d) ready after %llu ms", __func__, c->c_name,
	         (int)c->c_pid,
	         (unsigned long long)(now_mono_ms() - c->c_started_ms));
	dispatcher_scale_refresh(d, 1);
	dispatcher_run_drain(d);
}

void
dispatcher_spawn_stop(struct dispatcher *d)
{
	for (int k = 0; k < DISPATCHER_SLOTS_MAX; k++) {
		struct child *c = &d->d_child[k];

		switch (c->c_state) {
		case CHILD_BACKOFF:
			loop_timer_stop(c->c_timer);
			dispatcher_spawn_set_state(d, c, CHILD_IDLE);
			break;
		case CHILD_STARTING:
		case CHILD_READY:
			c->c_cause = CAUSE_STOP;
			dispatcher_spawn_set_state(d, c, CHILD_STOPPING);
			spawn_kill(c, SIGTERM);
			loop_timer_set(c->c_timer, DISPATCHER_STOP_KILL_MS);
			break;
		case CHILD_STOPPING:
			/* Retiring: already told.  Killed: nothing to add. */
			if (c->c_cause == CAUSE_RETIRE) {
				c->c_cause = CAUSE_STOP;
				loop_timer_set(c->c_timer,
				               DISPATCHER_STOP_KILL_MS);
			}
			break;
		case CHILD_IDLE:
			break;
		}
	}
	dispatcher_scale_refresh(d, 1);
	spawn_check_stopped(d);
}
