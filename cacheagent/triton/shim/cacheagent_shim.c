/*
 * cacheagent_shim.c -- the Triton repository agent "cacheagent", as a thin bridge.
 *
 * Triton loads this library from <repoagent-dir>/cacheagent/libtritonrepoagent_cacheagent.so.
 * All logic lives in a long-lived Python worker process; this file only moves
 * requests and answers between Triton and that worker. No Python runs inside
 * Triton's process, and nothing Triton-related is linked: the TRITONSERVER_* and
 * TRITONREPOAGENT_* callbacks below resolve from the host process at load time.
 *
 * Worker lifecycle
 *   - Started lazily, on the first action, by executing <dir of this .so>/cacheagent-worker
 *     (a tiny shell launcher written by `cacheagent install-triton`), then reused. Under
 *     `cacheagent run` the first one is already running (see adopt_prestarted).
 *   - The parent's pipe ends are O_CLOEXEC so Triton's other children (python backend
 *     stubs) never inherit them. The child keeps only stdin, stdout and stderr (stderr is
 *     Triton's, so Python tracebacks land in Triton's console).
 *   - No PR_SET_PDEATHSIG: it fires when the forking *thread* exits, and Triton's loader
 *     threads come and go. The worker exits instead on EOF on its stdin, or when its
 *     parent pid changes (a watchdog thread checks every second).
 *   - After any fault (death, hang, bad launcher) the worker is reaped and the next
 *     action starts a fresh one. A worker found dead between actions is replaced silently.
 *   - Finalize closes each worker's stdin, waits up to 5 s, then SIGKILLs and reaps it.
 *   - A worker handles one action at a time. Actions that arrive together (explicit-mode
 *     loads from several client threads) each take a free slot of a small pool, starting
 *     a worker there if needed, so no model waits behind another's download; all state
 *     is on disk, so any worker serves any model's next action. CACHEAGENT_WORKERS (4,
 *     at most 8) sizes the pool; 1 makes every action wait for the one worker.
 *
 * Shim -> worker: one JSON object per line:
 *   {"action": "LOAD"|"LOAD_COMPLETE"|"LOAD_FAIL"|"UNLOAD"|"UNLOAD_COMPLETE",
 *    "artifact_type": "FILESYSTEM"|"REMOTE_FILESYSTEM", "location": "...",
 *    "handle": "<hex address of the TRITONREPOAGENT_AgentModel>", "server_pid": <pid>,
 *    "params": {"k": "v", ...}, "config": <model config JSON for LOAD, else null>}
 *
 * Worker -> shim: tagged text lines, no JSON (text never contains newlines):
 *   READY <version>        once, at startup
 *   HB                     heartbeat, every second while a request is being handled
 *   LOG <level> <text>     level INFO|WARN|ERROR|VERBOSE, forwarded to Triton's log
 *   LEASE <path>           (LOAD, before OK) the snapshot's lease token file: the shim opens
 *                          it and holds a shared flock on it, kept in that model's state until
 *                          its LOAD_FAIL, UNLOAD_COMPLETE or ModelFinalize. A lease is live while
 *                          anyone holds its token, so it outlives a crashed or restarted worker.
 *   OK <path>              request done; a non-empty path on LOAD redirects Triton there
 *   ERR <text>             request failed; a LOAD fails with this message
 *
 * Timeouts (seconds, from the environment of tritonserver):
 *   CACHEAGENT_WORKER_IDLE_TIMEOUT   (60)   no line at all for this long: worker is hung
 *   CACHEAGENT_WORKER_ACTION_TIMEOUT (3600) one action may not take longer than this
 *
 * Failed actions other than LOAD are logged as warnings and reported as successes:
 * Triton can do nothing useful with a failed UNLOAD_COMPLETE.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- Triton ABI: our own declarations of the few types and calls we use (API 0.1) ---- */

#define CA_EXPORT __attribute__((visibility("default")))

typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Message TRITONSERVER_Message;
typedef struct TRITONREPOAGENT_Agent TRITONREPOAGENT_Agent;
typedef struct TRITONREPOAGENT_AgentModel TRITONREPOAGENT_AgentModel;

typedef enum { CA_ARTIFACT_FILESYSTEM = 0, CA_ARTIFACT_REMOTE_FILESYSTEM = 1 } TRITONREPOAGENT_ArtifactType;
typedef enum {
  CA_ACTION_LOAD = 0, CA_ACTION_LOAD_COMPLETE = 1, CA_ACTION_LOAD_FAIL = 2,
  CA_ACTION_UNLOAD = 3, CA_ACTION_UNLOAD_COMPLETE = 4
} TRITONREPOAGENT_ActionType;
typedef enum {
  CA_ERR_UNKNOWN = 0, CA_ERR_INTERNAL = 1, CA_ERR_NOT_FOUND = 2, CA_ERR_INVALID_ARG = 3,
  CA_ERR_UNAVAILABLE = 4, CA_ERR_UNSUPPORTED = 5, CA_ERR_ALREADY_EXISTS = 6
} TRITONSERVER_Error_Code;
typedef enum { CA_LOG_INFO = 0, CA_LOG_WARN = 1, CA_LOG_ERROR = 2, CA_LOG_VERBOSE = 3 } TRITONSERVER_LogLevel;

CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ApiVersion(uint32_t *major, uint32_t *minor);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelRepositoryLocation(
    TRITONREPOAGENT_Agent *, TRITONREPOAGENT_AgentModel *, TRITONREPOAGENT_ArtifactType *, const char **);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelRepositoryUpdate(
    TRITONREPOAGENT_Agent *, TRITONREPOAGENT_AgentModel *, TRITONREPOAGENT_ArtifactType, const char *);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelParameterCount(
    TRITONREPOAGENT_Agent *, TRITONREPOAGENT_AgentModel *, uint32_t *);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelParameter(
    TRITONREPOAGENT_Agent *, TRITONREPOAGENT_AgentModel *, uint32_t, const char **, const char **);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelState(TRITONREPOAGENT_AgentModel *, void **);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelSetState(TRITONREPOAGENT_AgentModel *, void *);
CA_EXPORT extern TRITONSERVER_Error *TRITONREPOAGENT_ModelConfig(
    TRITONREPOAGENT_Agent *, TRITONREPOAGENT_AgentModel *, uint32_t, TRITONSERVER_Message **);
CA_EXPORT extern TRITONSERVER_Error *TRITONSERVER_MessageSerializeToJson(
    TRITONSERVER_Message *, const char **, size_t *);
CA_EXPORT extern TRITONSERVER_Error *TRITONSERVER_MessageDelete(TRITONSERVER_Message *);
CA_EXPORT extern TRITONSERVER_Error *TRITONSERVER_ErrorNew(TRITONSERVER_Error_Code, const char *);
CA_EXPORT extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error *);
CA_EXPORT extern const char *TRITONSERVER_ErrorMessage(TRITONSERVER_Error *);
CA_EXPORT extern TRITONSERVER_Error *TRITONSERVER_LogMessage(TRITONSERVER_LogLevel, const char *, int, const char *);

/* ---- small helpers ---- */

#define MAX_LINE (16u << 20) /* a longer line from the worker is a protocol error */
#define FIRST_BUF (64u << 10)

static const char ca_anchor = 0; /* any symbol of ours, for dladdr */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void log_text(TRITONSERVER_LogLevel level, int line, const char *msg) {
  TRITONSERVER_Error *err = TRITONSERVER_LogMessage(level, "cacheagent_shim.c", line, msg);
  if (err) TRITONSERVER_ErrorDelete(err);
}

__attribute__((format(printf, 3, 4)))
static void ca_log(TRITONSERVER_LogLevel level, int line, const char *fmt, ...) {
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  log_text(level, line, msg);
}
#define LOGF(level, ...) ca_log(level, __LINE__, __VA_ARGS__)

/* A malloc'd message, never NULL: on OOM a static string is returned (never freed). */
static char oom_msg[] = "cacheagent: out of memory";
__attribute__((format(printf, 1, 2)))
static char *msgf(const char *fmt, ...) {
  char *s = NULL;
  va_list ap;
  va_start(ap, fmt);
  int n = vasprintf(&s, fmt, ap);
  va_end(ap);
  return n < 0 ? oom_msg : s;
}
static void msg_free(char *s) { if (s != oom_msg) free(s); }

static double env_seconds(const char *name, double dflt) {
  const char *s = getenv(name);
  if (!s || !*s) return dflt;
  char *end = NULL;
  double v = strtod(s, &end);
  if (end == s || *end != '\0' || !(v > 0) || v > 1e7) {
    LOGF(CA_LOG_WARN, "cacheagent: ignoring %s='%s' (want a positive number of seconds); using %g",
         name, s, dflt);
    return dflt;
  }
  return v;
}

/* Growable string; on OOM it sets oom and stops growing (checked once at the end). */
typedef struct { char *p; size_t len, cap; int oom; } sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
  if (b->oom) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return; }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}
static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

/* JSON string literal. Bytes >= 0x80 pass through (UTF-8 stays UTF-8). */
static void sb_json_str(sbuf *b, const char *s) {
  if (!s) { sb_puts(b, "null"); return; }
  sb_putn(b, "\"", 1);
  const char *run = s;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    sb_putn(b, run, (size_t)(s - run));
    char esc[8];
    switch (c) {
      case '"': sb_puts(b, "\\\""); break;
      case '\\': sb_puts(b, "\\\\"); break;
      case '\n': sb_puts(b, "\\n"); break;
      case '\r': sb_puts(b, "\\r"); break;
      case '\t': sb_puts(b, "\\t"); break;
      case '\b': sb_puts(b, "\\b"); break;
      case '\f': sb_puts(b, "\\f"); break;
      default: snprintf(esc, sizeof esc, "\\u%04x", c); sb_puts(b, esc); break;
    }
    run = s + 1;
  }
  sb_putn(b, run, (size_t)(s - run));
  sb_putn(b, "\"", 1);
}

static const char *action_name(TRITONREPOAGENT_ActionType a) {
  switch (a) {
    case CA_ACTION_LOAD: return "LOAD";
    case CA_ACTION_LOAD_COMPLETE: return "LOAD_COMPLETE";
    case CA_ACTION_LOAD_FAIL: return "LOAD_FAIL";
    case CA_ACTION_UNLOAD: return "UNLOAD";
    case CA_ACTION_UNLOAD_COMPLETE: return "UNLOAD_COMPLETE";
  }
  return NULL;
}

static const char *signal_name(int sig) {
  switch (sig) {
    case SIGKILL: return "SIGKILL"; case SIGTERM: return "SIGTERM"; case SIGINT: return "SIGINT";
    case SIGSEGV: return "SIGSEGV"; case SIGABRT: return "SIGABRT"; case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE"; case SIGILL: return "SIGILL"; case SIGHUP: return "SIGHUP";
    case SIGPIPE: return "SIGPIPE";
  }
  return "signal";
}

/* "exited with code 3" / "was killed by signal 9 (SIGKILL)" */
static void describe_status(int reaped, int status, char *out, size_t n) {
  if (!reaped) snprintf(out, n, "exited (status unknown)");
  else if (WIFEXITED(status)) snprintf(out, n, "exited with code %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(out, n, "was killed by signal %d (%s)", WTERMSIG(status), signal_name(WTERMSIG(status)));
  else snprintf(out, n, "stopped with status 0x%x", status);
}

/* Wait up to `grace` s for the child to exit, then SIGKILL it. Returns 1 if reaped. The
 * pid cannot be reused before we reap it, so the kill can never hit a stranger. */
static int reap(pid_t pid, double grace, int *status) {
  double end = now_s() + grace;
  for (;;) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid) return 1;
    if (r < 0 && errno != EINTR) return 0; /* ECHILD: SIGCHLD ignored by the host */
    if (now_s() >= end) break;
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  kill(pid, SIGKILL);
  while (waitpid(pid, status, 0) < 0)
    if (errno != EINTR) return 0;
  return 1;
}

/* ---- the worker ---- */

typedef struct {
  pid_t pid;          /* -1: no worker */
  int to_fd, from_fd; /* our ends of its stdin and stdout */
  char *buf;          /* bytes read from its stdout, [pos, len) not consumed yet */
  size_t pos, len, cap;
  int pending_lease;  /* LEASE fd of the request in flight */
  pthread_mutex_t mu; /* one action at a time per worker */
} worker_t;

/* A small pool: actions of different models run at once, each on a worker of its own
 * (explicit-mode loads from several client threads). Serial callers (every start-up,
 * poll mode) always find slot 0 free, so they use one worker process, as before. */
#define CA_MAX_WORKERS 8
#define CA_WORKER_INIT {-1, -1, -1, NULL, 0, 0, 0, -1, PTHREAD_MUTEX_INITIALIZER}
static worker_t g_pool[CA_MAX_WORKERS] = {CA_WORKER_INIT, CA_WORKER_INIT, CA_WORKER_INIT,
                                          CA_WORKER_INIT, CA_WORKER_INIT, CA_WORKER_INIT,
                                          CA_WORKER_INIT, CA_WORKER_INIT};

enum { RL_LINE = 1, RL_EOF = 0, RL_TIMEOUT = -1, RL_ERROR = -2 };

/* Next line from the worker, NUL-terminated, valid until the next call. */
static int read_line(worker_t *w, char **line, double deadline) {
  for (;;) {
    char *start = w->buf + w->pos;
    char *nl = w->len > w->pos ? memchr(start, '\n', w->len - w->pos) : NULL;
    if (nl) {
      *nl = '\0';
      w->pos = (size_t)(nl - w->buf) + 1;
      *line = start;
      return RL_LINE;
    }
    if (w->pos) {
      memmove(w->buf, start, w->len - w->pos);
      w->len -= w->pos;
      w->pos = 0;
    }
    if (w->len + 1 >= w->cap) { /* keep room for the NUL */
      if (w->cap >= MAX_LINE) return RL_ERROR;
      size_t cap = w->cap ? w->cap * 2 : FIRST_BUF;
      char *p = realloc(w->buf, cap);
      if (!p) return RL_ERROR;
      w->buf = p;
      w->cap = cap;
    }
    double left = deadline - now_s();
    int ms = left <= 0 ? 0 : left > 1e6 ? 1000000000 : (int)(left * 1000) + 1;
    struct pollfd pfd = {w->from_fd, POLLIN, 0};
    int r = poll(&pfd, 1, ms);
    if (r < 0) {
      if (errno == EINTR) continue;
      return RL_ERROR;
    }
    if (r == 0) {
      if (now_s() >= deadline) return RL_TIMEOUT;
      continue;
    }
    ssize_t n = read(w->from_fd, w->buf + w->len, w->cap - w->len - 1);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return RL_ERROR;
    }
    if (n == 0) return RL_EOF;
    w->len += (size_t)n;
  }
}

/* Write everything or fail, without ever raising SIGPIPE in Triton: SIGPIPE from a
 * pipe write is sent to the writing thread, so blocking it here and consuming a
 * pending one afterwards keeps it away from the host's handler. */
static int write_all(worker_t *w, const char *p, size_t n, double deadline) {
  sigset_t pipe_set, old, pending;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  sigpending(&pending);
  int was_pending = sigismember(&pending, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  int rc = RL_LINE, epipe = 0;
  while (n > 0) {
    ssize_t put = write(w->to_fd, p, n);
    if (put > 0) { p += put; n -= (size_t)put; continue; }
    if (put < 0 && errno == EINTR) continue;
    if (put < 0 && errno == EAGAIN) { /* pipe full: wait, but not forever */
      double left = deadline - now_s();
      if (left <= 0) { rc = RL_TIMEOUT; break; }
      struct pollfd pfd = {w->to_fd, POLLOUT, 0};
      poll(&pfd, 1, (int)(left * 1000) + 1);
      continue;
    }
    if (put < 0 && errno == EPIPE) { rc = RL_EOF; epipe = 1; break; }
    rc = RL_ERROR;
    break;
  }
  if (epipe && !was_pending) {
    struct timespec zero = {0, 0};
    while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {}
  }
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  return rc;
}

static void worker_forget(worker_t *w) {
  if (w->to_fd >= 0) close(w->to_fd);
  if (w->from_fd >= 0) close(w->from_fd);
  w->pid = -1;
  w->to_fd = w->from_fd = -1;
  w->pos = w->len = 0;
}

/* Kill (if kill_first) or wait for the worker, reap it, describe how it ended. */
static void worker_end(worker_t *w, int kill_first, char *how, size_t n) {
  int status = 0;
  if (kill_first) kill(w->pid, SIGKILL);
  int reaped = reap(w->pid, kill_first ? 0 : 2.0, &status);
  describe_status(reaped, status, how, n);
  worker_forget(w);
}

/* "cacheagent: " unless the worker's text already says who it is. */
static const char *prefix_for(const char *text) {
  return strncmp(text, "cacheagent", 10) == 0 ? "" : "cacheagent: ";
}

static void forward_log(const char *rest) {
  static const struct { const char *name; TRITONSERVER_LogLevel level; } levels[] = {
      {"INFO", CA_LOG_INFO}, {"WARN", CA_LOG_WARN}, {"ERROR", CA_LOG_ERROR}, {"VERBOSE", CA_LOG_VERBOSE}};
  TRITONSERVER_LogLevel level = CA_LOG_INFO;
  for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++) {
    size_t k = strlen(levels[i].name);
    if (strncmp(rest, levels[i].name, k) == 0 && (rest[k] == ' ' || rest[k] == '\0')) {
      level = levels[i].level;
      rest += k + (rest[k] == ' ');
      break;
    }
  }
  char *msg = msgf("%s%s", prefix_for(rest), rest);
  log_text(level, __LINE__, msg);
  msg_free(msg);
}

/* Where the launcher is: beside this library, as Triton loaded it. */
static int locate_launcher(char *launcher, size_t n, char *agent_dir, size_t dn) {
  Dl_info info;
  if (!dladdr(&ca_anchor, &info) || !info.dli_fname) return -1;
  const char *slash = strrchr(info.dli_fname, '/');
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - info.dli_fname) : 1,
           slash ? info.dli_fname : ".");
  char abs_dir[PATH_MAX];
  const char *d = realpath(dir, abs_dir) ? abs_dir : dir; /* the dir exists: we live in it */
  snprintf(launcher, n, "%s/cacheagent-worker", d);
  const char *up = strrchr(d, '/');
  snprintf(agent_dir, dn, "%.*s", up && up != d ? (int)(up - d) : 1, up ? d : ".");
  return 0;
}

/* Runs in the forked child: only async-signal-safe calls until exec. */
static void child_exec(int in_fd, int out_fd, const char *path, char *const argv[]) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL); /* the forking thread's mask would be inherited */
  struct sigaction dfl;
  memset(&dfl, 0, sizeof dfl);
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGPIPE, &dfl, NULL); /* ignored dispositions survive exec; reset the ones */
  sigaction(SIGCHLD, &dfl, NULL); /* that would change the worker's behaviour */
  /* Move both ends above 2 first, so dup2 onto 0/1 cannot clobber the other one. */
  int a = fcntl(in_fd, F_DUPFD, 3), b = fcntl(out_fd, F_DUPFD, 3);
  if (a < 0 || b < 0 || dup2(a, 0) < 0 || dup2(b, 1) < 0) _exit(126);
#ifdef SYS_close_range
  if (syscall(SYS_close_range, 3u, ~0u, 0u) != 0)
#endif
  {
    struct rlimit rl;
    long max = getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 1048576 ? (long)rl.rlim_cur : 1048576;
    for (long fd = 3; fd < max; fd++) close((int)fd);
  }
  execv(path, argv);
  static const char m1[] = "cacheagent: cannot execute the worker launcher ";
  (void)!write(2, m1, sizeof m1 - 1);
  (void)!write(2, path, strlen(path));
  (void)!write(2, "\n", 1);
  _exit(127);
}

/* A worker `cacheagent run` started before Triton, named by CACHEAGENT_WORKER_FDS as
 * "<pid>,<its stdin's write end>,<its stdout's read end>" (fds Triton inherited). The
 * first worker_start adopts it instead of fork+exec, once. It is the launcher's child,
 * not ours: waitpid says ECHILD (reap returns at once, no kill), the launcher reaps it,
 * and it still ends on EOF on its stdin like any worker. */
static pthread_mutex_t g_adopt_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_adopt_done = 0;

static int prestarted_fds(int *pid, int *to, int *from) {
  const char *spec = getenv("CACHEAGENT_WORKER_FDS");
  if (!spec || sscanf(spec, "%d,%d,%d", pid, to, from) != 3) return 0;
  return *pid > 0 && *to > 2 && *from > 2 && fcntl(*to, F_GETFD) >= 0 &&
         fcntl(*from, F_GETFD) >= 0;
}

/* At Initialize: Triton's other children (python backend stubs) must not inherit them. */
static void prestarted_cloexec(void) {
  int pid, to, from;
  pthread_mutex_lock(&g_adopt_mu);
  if (!g_adopt_done && prestarted_fds(&pid, &to, &from)) {
    fcntl(to, F_SETFD, FD_CLOEXEC);
    fcntl(from, F_SETFD, FD_CLOEXEC);
  }
  pthread_mutex_unlock(&g_adopt_mu);
}

static int adopt_prestarted(worker_t *w) {
  int pid, to, from, adopted = 0;
  pthread_mutex_lock(&g_adopt_mu);
  if (!g_adopt_done) {
    g_adopt_done = 1;
    if (prestarted_fds(&pid, &to, &from)) {
      fcntl(to, F_SETFD, FD_CLOEXEC);
      fcntl(from, F_SETFD, FD_CLOEXEC);
      fcntl(to, F_SETFL, fcntl(to, F_GETFL) | O_NONBLOCK); /* so writes can time out */
      w->pid = (pid_t)pid;
      w->to_fd = to;
      w->from_fd = from;
      w->pos = w->len = 0;
      adopted = 1;
    }
  }
  pthread_mutex_unlock(&g_adopt_mu);
  return adopted;
}

/* Start a worker and wait for READY. Returns NULL or a failure message (msg_free it). */
static char *worker_start(worker_t *w, double idle_timeout) {
  char launcher[PATH_MAX + 32], agent_dir[PATH_MAX];
  if (locate_launcher(launcher, sizeof launcher, agent_dir, sizeof agent_dir) != 0)
    return msgf("cacheagent: cannot find the directory of libtritonrepoagent_cacheagent.so (dladdr failed)");
  if (access(launcher, F_OK) != 0 || access(launcher, X_OK) != 0)
    return msgf("cacheagent: cannot start the worker: the launcher '%s' %s. "
                "Run `cacheagent install-triton --repoagent-dir %s` again.",
                launcher, errno == ENOENT ? "does not exist" : "is not executable", agent_dir);
  if (adopt_prestarted(w)) goto wait_ready;
  int req[2], resp[2];
  if (pipe2(req, O_CLOEXEC) != 0) return msgf("cacheagent: pipe2 failed: %s", strerror(errno));
  if (pipe2(resp, O_CLOEXEC) != 0) {
    int e = errno;
    close(req[0]);
    close(req[1]);
    return msgf("cacheagent: pipe2 failed: %s", strerror(e));
  }
  char *argv[] = {launcher, NULL};
  pid_t pid = fork();
  if (pid == 0) child_exec(req[0], resp[1], launcher, argv);
  int fork_errno = errno;
  close(req[0]);
  close(resp[1]);
  if (pid < 0) {
    close(req[1]);
    close(resp[0]);
    return msgf("cacheagent: cannot start the worker: fork failed: %s", strerror(fork_errno));
  }
  fcntl(req[1], F_SETFL, fcntl(req[1], F_GETFL) | O_NONBLOCK); /* so writes can time out */
  w->pid = pid;
  w->to_fd = req[1];
  w->from_fd = resp[0];
  w->pos = w->len = 0;

wait_ready:;
  double deadline = now_s() + idle_timeout;
  for (;;) {
    char *line = NULL;
    int rc = read_line(w, &line, deadline);
    if (rc == RL_LINE) {
      if (strncmp(line, "READY", 5) == 0) {
        LOGF(CA_LOG_INFO, "cacheagent: worker pid %d started (%s)", (int)w->pid, line);
        return NULL;
      }
      if (strncmp(line, "LOG ", 4) == 0) forward_log(line + 4);
      continue;
    }
    char how[128];
    worker_end(w, rc != RL_EOF, how, sizeof how);
    return msgf("cacheagent: cannot start the worker: the launcher '%s' %s before it was ready%s. "
                "Its error output is in Triton's console. Check that the Python it runs has "
                "cacheagent installed (or fix CACHEAGENT_PYTHON), and run "
                "`cacheagent install-triton --repoagent-dir %s` again.",
                launcher, rc == RL_TIMEOUT ? "did not answer" : how,
                rc == RL_TIMEOUT ? " and was killed" : "", agent_dir);
  }
}

/* Between actions: forward anything pending; notice a worker that died meanwhile. */
static void worker_check_idle(worker_t *w) {
  int status = 0;
  pid_t r = waitpid(w->pid, &status, WNOHANG);
  int rc = RL_LINE;
  char *line = NULL;
  if (r != w->pid) {
    while ((rc = read_line(w, &line, 0)) == RL_LINE)
      if (strncmp(line, "LOG ", 4) == 0) forward_log(line + 4);
    if (rc == RL_TIMEOUT) return; /* nothing more to read: alive and idle */
  }
  char how[128];
  if (r == w->pid) {
    describe_status(1, status, how, sizeof how);
    worker_forget(w);
  } else {
    worker_end(w, rc != RL_EOF, how, sizeof how);
  }
  LOGF(CA_LOG_WARN, "cacheagent: the worker %s while idle; starting a fresh one", how);
}

/* ---- leases: the shim holds each loaded model's lease token ---- */

/* The worker reported the lease token of the snapshot it answers a LOAD with: hold a
 * shared flock on it here too, so the lease lives as long as Triton serves the model,
 * whatever happens to the worker. The worker still holds it, so it never looks dead. */
static void hold_reported_lease(worker_t *w, const char *path) {
  if (w->pending_lease >= 0) close(w->pending_lease);
  w->pending_lease = -1;
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
  if (fd < 0) {
    LOGF(CA_LOG_WARN, "cacheagent: cannot open the lease token '%s' (%s); the lease ends with "
         "the worker process", path, strerror(errno));
    return;
  }
  /* A cleaner's liveness probe locks it exclusively for microseconds: retry, for 1 s at most. */
  for (int tries = 0; flock(fd, LOCK_SH | LOCK_NB) != 0; tries++) {
    if ((errno != EWOULDBLOCK && errno != EINTR) || tries >= 200) {
      LOGF(CA_LOG_WARN, "cacheagent: cannot lock the lease token '%s' (%s); the lease ends with "
           "the worker process", path, strerror(errno));
      close(fd);
      return;
    }
    struct timespec ts = {0, 5 * 1000 * 1000};
    nanosleep(&ts, NULL);
  }
  w->pending_lease = fd;
}

/* A model's lease fd lives in its Triton model state, stored as fd + 1 (0: none). */
static int model_lease_fd(TRITONREPOAGENT_AgentModel *model) {
  void *state = NULL;
  TRITONSERVER_Error *err = TRITONREPOAGENT_ModelState(model, &state);
  if (err) {
    TRITONSERVER_ErrorDelete(err);
    return -1;
  }
  return (int)(intptr_t)state - 1;
}

static void model_drop_lease(TRITONREPOAGENT_AgentModel *model) {
  int fd = model_lease_fd(model);
  if (fd < 0) return;
  close(fd); /* the lease ends here unless the worker still holds it too */
  TRITONSERVER_Error *err = TRITONREPOAGENT_ModelSetState(model, NULL);
  if (err) TRITONSERVER_ErrorDelete(err);
}

static void model_keep_lease(TRITONREPOAGENT_AgentModel *model, int fd) {
  model_drop_lease(model); /* a model reloaded without an unload keeps one lease only */
  if (fd < 0) return;
  TRITONSERVER_Error *err = TRITONREPOAGENT_ModelSetState(model, (void *)(intptr_t)(fd + 1));
  if (err) {
    LOGF(CA_LOG_WARN, "cacheagent: cannot keep the model's lease token: %s",
         TRITONSERVER_ErrorMessage(err));
    TRITONSERVER_ErrorDelete(err);
    close(fd);
  }
}

typedef enum { RES_OK, RES_ERR, RES_FAIL } result_t;

/* One request/answer exchange. *text: the payload of OK/ERR, or the failure message. */
static result_t worker_request(worker_t *w, sbuf *req, const char *action, const char *location,
                               char **text) {
  double idle = env_seconds("CACHEAGENT_WORKER_IDLE_TIMEOUT", 60);
  double limit = env_seconds("CACHEAGENT_WORKER_ACTION_TIMEOUT", 3600);
  if (w->pid > 0) worker_check_idle(w);
  if (w->pid <= 0) {
    char *err = worker_start(w, idle);
    if (err) { *text = err; return RES_FAIL; }
  }
  pid_t pid = w->pid;
  double t0 = now_s(), action_deadline = t0 + limit, idle_deadline = t0 + idle;
  int rc = write_all(w, req->p, req->len, idle_deadline < action_deadline ? idle_deadline : action_deadline);
  while (rc == RL_LINE) {
    char *line = NULL;
    rc = read_line(w, &line, idle_deadline < action_deadline ? idle_deadline : action_deadline);
    if (rc != RL_LINE) break;
    idle_deadline = now_s() + idle;
    if (strcmp(line, "HB") == 0 || strncmp(line, "READY", 5) == 0) continue;
    if (strncmp(line, "LOG ", 4) == 0) { forward_log(line + 4); continue; }
    if (strncmp(line, "LEASE ", 6) == 0) { hold_reported_lease(w, line + 6); continue; }
    int ok = strncmp(line, "OK", 2) == 0 && (line[2] == ' ' || line[2] == '\0');
    int bad = strncmp(line, "ERR", 3) == 0 && (line[3] == ' ' || line[3] == '\0');
    if (ok || bad) {
      const char *payload = line + (ok ? 2 : 3);
      *text = msgf("%s", *payload ? payload + 1 : "");
      return ok ? RES_OK : RES_ERR;
    }
    LOGF(CA_LOG_WARN, "cacheagent: ignoring an unexpected line from the worker: %.200s", line);
  }
  char how[128];
  if (rc == RL_EOF) {
    worker_end(w, 0, how, sizeof how);
    *text = msgf("cacheagent: the worker process (pid %d) %s while handling %s for model location "
                 "'%s'. Its error output is in Triton's console. The next action starts a fresh worker.",
                 (int)pid, how, action, location);
  } else if (rc == RL_TIMEOUT && now_s() >= action_deadline) {
    worker_end(w, 1, how, sizeof how);
    *text = msgf("cacheagent: the worker process (pid %d) did not finish %s for model location '%s' "
                 "within %g s (CACHEAGENT_WORKER_ACTION_TIMEOUT); it was killed. "
                 "The next action starts a fresh worker.", (int)pid, action, location, limit);
  } else if (rc == RL_TIMEOUT) {
    worker_end(w, 1, how, sizeof how);
    *text = msgf("cacheagent: the worker process (pid %d) sent nothing for %g s "
                 "(CACHEAGENT_WORKER_IDLE_TIMEOUT) while handling %s for model location '%s': it is "
                 "hung or stopped, and was killed. The next action starts a fresh worker.",
                 (int)pid, idle, action, location);
  } else {
    worker_end(w, 1, how, sizeof how);
    *text = msgf("cacheagent: lost the connection to the worker process (pid %d) while handling %s "
                 "for model location '%s' (I/O error or oversized line); it was killed. "
                 "The next action starts a fresh worker.", (int)pid, action, location);
  }
  return RES_FAIL;
}

/* The request line for one action (see the protocol at the top). */
static void build_request(sbuf *b, TRITONREPOAGENT_Agent *agent, TRITONREPOAGENT_AgentModel *model,
                          const char *action, TRITONREPOAGENT_ArtifactType atype, const char *location) {
  char num[96];
  sb_puts(b, "{\"action\": ");
  sb_json_str(b, action);
  sb_puts(b, ", \"artifact_type\": ");
  sb_json_str(b, atype == CA_ARTIFACT_REMOTE_FILESYSTEM ? "REMOTE_FILESYSTEM" : "FILESYSTEM");
  sb_puts(b, ", \"location\": ");
  sb_json_str(b, location);
  snprintf(num, sizeof num, ", \"handle\": \"%p\", \"server_pid\": %ld, \"params\": {",
           (void *)model, (long)getpid());
  sb_puts(b, num);
  uint32_t count = 0;
  TRITONSERVER_Error *err = TRITONREPOAGENT_ModelParameterCount(agent, model, &count);
  if (err) {
    LOGF(CA_LOG_WARN, "cacheagent: cannot read agent parameters: %s", TRITONSERVER_ErrorMessage(err));
    TRITONSERVER_ErrorDelete(err);
    count = 0;
  }
  for (uint32_t i = 0, n = 0; i < count; i++) {
    const char *key = NULL, *value = NULL;
    err = TRITONREPOAGENT_ModelParameter(agent, model, i, &key, &value);
    if (err || !key) {
      if (err) TRITONSERVER_ErrorDelete(err);
      continue;
    }
    if (n++) sb_puts(b, ", ");
    sb_json_str(b, key);
    sb_puts(b, ": ");
    sb_json_str(b, value ? value : "");
  }
  sb_puts(b, "}, \"config\": ");
  TRITONSERVER_Message *config = NULL;
  const char *json = NULL;
  size_t json_len = 0;
  /* Triton resolves the config only around LOAD; later actions don't need it. */
  if (strcmp(action, "LOAD") == 0) {
    err = TRITONREPOAGENT_ModelConfig(agent, model, 1, &config);
    if (!err && config) err = TRITONSERVER_MessageSerializeToJson(config, &json, &json_len);
    if (err) {
      LOGF(CA_LOG_WARN, "cacheagent: cannot read the model config: %s", TRITONSERVER_ErrorMessage(err));
      TRITONSERVER_ErrorDelete(err);
      json_len = 0;
    }
  }
  if (json && json_len > 0 && memchr(json, '\n', json_len) == NULL) sb_putn(b, json, json_len);
  else sb_puts(b, "null");
  if (config) {
    err = TRITONSERVER_MessageDelete(config);
    if (err) TRITONSERVER_ErrorDelete(err);
  }
  sb_puts(b, "}\n");
}

/* ---- the exported entry points ---- */

CA_EXPORT TRITONSERVER_Error *TRITONREPOAGENT_Initialize(TRITONREPOAGENT_Agent *agent) {
  (void)agent;
  uint32_t major = 0, minor = 0;
  TRITONSERVER_Error *err = TRITONREPOAGENT_ApiVersion(&major, &minor);
  if (err) return err;
  if (major != 0 || minor < 1) {
    char msg[256];
    snprintf(msg, sizeof msg, "cacheagent: built for repository agent API 0.1, but this Triton "
             "provides %u.%u", major, minor);
    return TRITONSERVER_ErrorNew(CA_ERR_UNSUPPORTED, msg);
  }
  prestarted_cloexec();
  LOGF(CA_LOG_VERBOSE, "cacheagent: agent initialized (repository agent API %u.%u)", major, minor);
  return NULL;
}

/* How many workers actions may use at once: CACHEAGENT_WORKERS (1 makes them serial). */
static int pool_size(void) {
  double n = env_seconds("CACHEAGENT_WORKERS", 4);
  return n < 1 ? 1 : n > CA_MAX_WORKERS ? CA_MAX_WORKERS : (int)n;
}

/* A free worker slot, locked: an action never waits behind another model's action
 * while a slot is free. With every slot busy it waits for one, and says so. */
static worker_t *acquire_worker(const char *action, const char *location) {
  static unsigned turn = 0;
  int n = pool_size();
  for (int i = 0; i < n; i++)
    if (pthread_mutex_trylock(&g_pool[i].mu) == 0) return &g_pool[i];
  worker_t *w = &g_pool[__atomic_fetch_add(&turn, 1, __ATOMIC_RELAXED) % (unsigned)n];
  LOGF(CA_LOG_INFO, "cacheagent: %s of '%s' waits: all %d workers are busy with other models "
       "(CACHEAGENT_WORKERS)", action, location, n);
  pthread_mutex_lock(&w->mu);
  return w;
}

static void worker_stop(worker_t *w) {
  pthread_mutex_lock(&w->mu);
  if (w->pid > 0) {
    pid_t pid = w->pid;
    close(w->to_fd); /* EOF on its stdin: the worker exits on its own */
    w->to_fd = -1;
    int status = 0;
    char how[128];
    describe_status(reap(pid, 5.0, &status), status, how, sizeof how);
    worker_forget(w);
    LOGF(CA_LOG_VERBOSE, "cacheagent: worker pid %d stopped: %s", (int)pid, how);
  }
  free(w->buf); /* Triton dlcloses us after Finalize: leave nothing behind */
  w->buf = NULL;
  w->cap = 0;
  pthread_mutex_unlock(&w->mu);
}

CA_EXPORT TRITONSERVER_Error *TRITONREPOAGENT_Finalize(TRITONREPOAGENT_Agent *agent) {
  (void)agent;
  for (int i = 0; i < CA_MAX_WORKERS; i++) worker_stop(&g_pool[i]);
  return NULL;
}

CA_EXPORT TRITONSERVER_Error *TRITONREPOAGENT_ModelAction(TRITONREPOAGENT_Agent *agent,
                                                          TRITONREPOAGENT_AgentModel *model,
                                                          const TRITONREPOAGENT_ActionType action_type) {
  const char *action = action_name(action_type);
  if (!action) return NULL; /* an action newer than this agent: nothing to do */
  int is_load = action_type == CA_ACTION_LOAD;
  TRITONREPOAGENT_ArtifactType atype = CA_ARTIFACT_FILESYSTEM;
  const char *location = NULL;
  TRITONSERVER_Error *err = TRITONREPOAGENT_ModelRepositoryLocation(agent, model, &atype, &location);
  if (err) {
    if (!is_load) {
      LOGF(CA_LOG_WARN, "cacheagent: %s: cannot get the model location: %s", action,
           TRITONSERVER_ErrorMessage(err));
      TRITONSERVER_ErrorDelete(err);
    }
    return is_load ? err : NULL;
  }
  if (!location) location = "";
  LOGF(CA_LOG_VERBOSE, "cacheagent: %s of '%s'", action, location);

  sbuf req = {NULL, 0, 0, 0};
  char *text = NULL;
  result_t res;
  worker_t *w = acquire_worker(action, location);
  build_request(&req, agent, model, action, atype, location);
  if (req.oom) {
    res = RES_FAIL;
    text = msgf("cacheagent: out of memory building the %s request", action);
  } else {
    res = worker_request(w, &req, action, location, &text);
  }
  int lease_fd = w->pending_lease; /* reported by this LOAD's worker, if any */
  w->pending_lease = -1;
  pthread_mutex_unlock(&w->mu);
  free(req.p);

  TRITONSERVER_Error *result = NULL;
  if (res == RES_OK) {
    if (is_load && text[0]) {
      LOGF(CA_LOG_VERBOSE, "cacheagent: %s: loading from %s", location, text);
      result = TRITONREPOAGENT_ModelRepositoryUpdate(agent, model, CA_ARTIFACT_FILESYSTEM, text);
      if (!result) {
        model_keep_lease(model, lease_fd);
        lease_fd = -1;
      }
    }
  } else {
    char *msg = msgf("%s%s", prefix_for(text), text);
    if (is_load) {
      result = TRITONSERVER_ErrorNew(CA_ERR_INTERNAL, msg);
    } else {
      LOGF(CA_LOG_WARN, "cacheagent: %s for '%s' failed (ignored): %s", action, location, msg);
    }
    msg_free(msg);
  }
  if (lease_fd >= 0) close(lease_fd); /* the LOAD did not succeed: nothing to hold */
  if (action_type == CA_ACTION_LOAD_FAIL || action_type == CA_ACTION_UNLOAD_COMPLETE)
    model_drop_lease(model); /* after the worker released it: the snapshot may go now */
  msg_free(text);
  return result;
}

CA_EXPORT TRITONSERVER_Error *TRITONREPOAGENT_ModelFinalize(TRITONREPOAGENT_Agent *agent,
                                                            TRITONREPOAGENT_AgentModel *model) {
  (void)agent;
  model_drop_lease(model); /* normally gone at UNLOAD_COMPLETE already */
  return NULL;
}
