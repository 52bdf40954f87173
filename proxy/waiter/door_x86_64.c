/* pyproxy-door for x86-64 Linux: the front door of `pyproxy` for a runtime's spawns, in the
 * same binary as pyproxy-wait (waiter_x86_64.s's _start comes here when argv[1] is neither
 * "ready" nor "-"). Freestanding C: no libc, its own system calls, nothing written outside
 * its stack, so the binary keeps one read-only segment and a waiter's cost stays its stack.
 *
 * dockerd spawns one process per published port and waits for "0\n" on fd 3. With an engine
 * running, the Python pyproxy only hands its argv (and fd 4) over and becomes the waiter;
 * this does exactly that handover (proxy/launch.py main(), proxy/handover.py hand_over())
 * without an interpreter's start, and for anything else execs the Python pyproxy beside this
 * binary with argv and environment unchanged (fall_back), which then does what it always did:
 *
 *   - not a plain registration: no argv[1], a re-attach, a flag answered locally (-h, -v,
 *     -engine, -list), any -engine-socket flag, PYPROXY_WAIT_SHELL set, PYPROXY_ENGINE_SOCKET
 *     set empty, an engine path that is not absolute, normalised and short enough;
 *   - no engine answers (Python starts one or serves here), or the one that answers is not
 *     trusted (Python says why on fd 3: nothing is sent to it here either);
 *   - the engine's reply is not a status-0 registration (Python registers again and reports
 *     the engine's error as it always did: a second registration only on failure paths).
 *
 * SIGINT and SIGTERM stay blocked from _start's first system call to the exec, whichever
 * program that is: a stop meanwhile waits, pending across the exec, for the waiter's handler
 * (which asks the engine to release the port) or pyproxy's (catch_stop_signals unblocks them).
 *
 * Build: proxy/waiter/build.sh; tests/test_door.py runs it through a live engine.
 */

typedef unsigned long size_t;
typedef long ssize_t;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_stat 4
#define SYS_fstat 5
#define SYS_dup2 33
#define SYS_socket 41
#define SYS_connect 42
#define SYS_sendmsg 46
#define SYS_recvmsg 47
#define SYS_getsockopt 55
#define SYS_execve 59
#define SYS_fcntl 72
#define SYS_readlink 89
#define SYS_geteuid 107
#define SYS_exit_group 231
#define SYS_rt_sigaction 13
#define SYS_poll 7
#define SYS_sendto 44
#define SYS_signalfd4 289

#define EINTR 4
#define ENOENT 2
#define EACCES 13
#define ENOEXEC 8
#define E2BIG 7
#define AF_UNIX 1
#define SOCK_STREAM 1
#define SOCK_CLOEXEC 02000000
#define SOCK_NONBLOCK 04000
#define SOL_SOCKET 1
#define SCM_RIGHTS 1
#define SO_PEERCRED 17
#define MSG_NOSIGNAL 0x4000
#define F_SETFD 2
#define F_SETFL 4
#define FD_CLOEXEC 1
#define S_IFMT 0170000
#define S_IFIFO 0010000
#define S_IFSOCK 0140000

#define SIGPIPE 13
#define SIG_IGN 1
#define SIGINT 2
#define SIGTERM 15
#define SFD_CLOEXEC 02000000
#define POLLIN 1
#define STOP_TIMEOUT_MS 2000 /* handover.STOP_TIMEOUT */

#define STATUS_FD 3
#define LISTEN_FD 4
#define MAX_PAYLOAD 65536 /* proxy/ground/wire.py */
#define MAX_DIGITS 5      /* len(str(MAX_PAYLOAD)) */
#define MAX_HELD 64       /* wire.MAX_HELD: listening sockets one reply may carry */
#define SUN_PATH 108
#define PATH_MAX 4096

static long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static long sys5(long n, long a, long b, long c, long d, long e)
{
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return r;
}

struct kstat { /* struct stat as x86-64's kernel writes it */
    unsigned long dev, ino, nlink;
    unsigned int mode, uid, gid, pad;
    unsigned long rdev;
    long size, blksize, blocks, times[6], reserved[3];
};

struct iovec { void *base; size_t len; };

struct msghdr {
    void *name; int namelen;
    struct iovec *iov; size_t iovlen;
    void *control; size_t controllen;
    int flags;
};

#define CMSG_HEAD 16 /* struct cmsghdr: size_t len; int level, type */

static size_t length(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int starts(const char *s, const char *prefix)
{
    while (*prefix)
        if (*s++ != *prefix++)
            return 0;
    return 1;
}

/* `arg` is `flag` or `flag=...`: Python's arg.partition("=")[0] == flag. */
static int flag_is(const char *arg, const char *flag)
{
    return starts(arg, flag) && (arg[length(flag)] == 0 || arg[length(flag)] == '=');
}

static int flag_in(const char *arg, const char *flags) /* flags: "a\0b\0...\0" */
{
    for (; *flags; flags += length(flags) + 1)
        if (flag_is(arg, flags))
            return 1;
    return 0;
}

static char *put(char *to, const char *from, size_t n)
{
    while (n--)
        *to++ = *from++;
    return to;
}

static char *put_number(char *to, unsigned long n)
{
    char digits[20];
    int i = 0;
    do
        digits[i++] = '0' + n % 10;
    while (n /= 10);
    while (i)
        *to++ = digits[--i];
    return to;
}

static int mode_of(int fd) /* its S_IFMT bits; 0 if it is not open */
{
    struct kstat st;
    return sys3(SYS_fstat, fd, (long)&st, 0) < 0 ? 0 : (int)(st.mode & S_IFMT);
}

static void set_cloexec(int fd, int on)
{
    sys3(SYS_fcntl, fd, F_SETFD, on ? FD_CLOEXEC : 0);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n) {
        long done = sys3(SYS_write, fd, (long)p, (long)n);
        if (done == -EINTR)
            continue;
        if (done <= 0)
            return; /* whoever reads it went away: nothing left to tell */
        p += done;
        n -= (size_t)done;
    }
}

static __attribute__((noreturn)) void exit_group(int code)
{
    for (;;)
        sys3(SYS_exit_group, code, 0, 0);
}

/* As StatusPipe.fail: "1\n<text>" on fd 3 when it is the status pipe, and on stderr. */
static __attribute__((noreturn)) void fail(int attached, const char *what, const char *path, long err)
{
    char text[PATH_MAX + 256], *end = text;
    const char *why = err == -ENOENT ? "no such file or directory"
                    : err == -EACCES ? "permission denied"
                    : err == -ENOEXEC ? "exec format error"
                    : err == -E2BIG ? "argument list too long" : 0;
    end = put(end, "1\npyproxy-door: ", 16);
    end = put(end, what, length(what));
    end = put(end, path, length(path));
    end = put(end, ": ", 2);
    if (why)
        end = put(end, why, length(why));
    else
        end = put_number(put(end, "errno ", 6), (unsigned long)-err);
    *end++ = '\n';
    write_all(2, "pyproxy: ", 9);
    write_all(2, text + 2, (size_t)(end - text - 2));
    if (attached)
        write_all(STATUS_FD, text, (size_t)(end - text - 1)); /* "1\n" + text, no newline */
    exit_group(1);
}

/* The directory this binary is in (/proc/self/exe, symlinks resolved), with "/" + `name`
 * appended: where the Python pyproxy is. */
static void beside_me(char *path, const char *name, int attached)
{
    long n = sys3(SYS_readlink, (long)"/proc/self/exe", (long)path, PATH_MAX - 16);
    if (n <= 0)
        fail(attached, "cannot find its own directory: ", "/proc/self/exe", n);
    while (n > 0 && path[n - 1] != '/')
        n--;
    *put(path + n, name, length(name) + 1) = 0;
}

/* Exec the Python pyproxy with our argv and environment, the stop signals still blocked. */
static __attribute__((noreturn)) void fall_back(char **argv, char **envp, int attached)
{
    char path[PATH_MAX];
    beside_me(path, "pyproxy", attached);
    argv[0] = path;
    fail(attached, "cannot run ", path, sys3(SYS_execve, (long)path, (long)argv, (long)envp));
}

/* What launch.main() does not hand over as it comes: anything answered or decided locally. */
static const char LOCAL_FLAGS[] =
    "-h\0-help\0--help\0-v\0-version\0--version\0-engine\0--engine\0-list\0--list\0";
static const char LISTEN_FD_FLAGS[] = "-use-listen-fd\0--use-listen-fd\0";

static int plain_registration(long argc, char **argv)
{
    if (argc < 2 || starts(argv[1], "-engine-reattach"))
        return 0;
    for (long i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (flag_in(name, LOCAL_FLAGS))
            return 0;
        if (*name == '-') { /* -engine-socket in any spelling: Python reads it */
            while (*name == '-')
                name++;
            if (flag_is(name, "engine-socket"))
                return 0;
        }
    }
    return 1;
}

/* The engine's path, or 0 when Python must decide (see the top). */
static const char *engine_path(char **envp)
{
    const char *path = "/run/pyproxy/engine.sock"; /* wire.DEFAULT_ENGINE_SOCKET */
    int seen = 0;
    for (; *envp; envp++) {
        if (starts(*envp, "PYPROXY_WAIT_SHELL=") && (*envp)[19])
            return 0;
        if (!seen && starts(*envp, "PYPROXY_ENGINE_SOCKET=")) { /* the first, as os.environ */
            path = *envp + 22;
            seen = 1;
        }
    }
    size_t n = length(path);
    /* check_engine takes os.path.abspath's directory: here only paths it leaves as they are */
    if (path[0] != '/' || n >= SUN_PATH || path[n - 1] == '/')
        return 0;
    for (const char *p = path; *p; p++)
        if (p[0] == '/' && (p[1] == '/' || (p[1] == '.' && (p[2] == '/' || !p[2]
                                            || (p[2] == '.' && (p[3] == '/' || !p[3]))))))
            return 0;
    return path;
}

/* check_engine: the socket's directory writable by root or us only, served by root or us. */
static int trusted(int conn, const char *path)
{
    char directory[SUN_PATH];
    size_t n = length(path);
    while (path[n - 1] != '/')
        n--;
    if (n > 1)
        n--; /* "/run/pyproxy/engine.sock" -> "/run/pyproxy"; "/engine.sock" -> "/" */
    *put(directory, path, n) = 0;
    unsigned int euid = (unsigned int)sys3(SYS_geteuid, 0, 0, 0);
    struct kstat st;
    if (sys3(SYS_stat, (long)directory, (long)&st, 0) < 0
        || (st.uid != 0 && st.uid != euid) || (st.mode & 022))
        return 0;
    unsigned int cred[3]; /* struct ucred: pid, uid, gid */
    unsigned int size = sizeof cred;
    if (sys5(SYS_getsockopt, conn, SOL_SOCKET, SO_PEERCRED, (long)cred, (long)&size) < 0)
        return 0;
    return cred[1] == 0 || cred[1] == euid;
}

static int connect_engine(const char *path)
{
    struct { unsigned short family; char path[SUN_PATH]; } address;
    size_t n = length(path);
    /* Non-blocking for the connect only: with the engine's backlog full (an engine stopped or
     * wedged, and spawns piling up), a blocking connect would wait with the stop signals
     * blocked, for ever; EAGAIN then goes on to Python, whose connect a stop interrupts. */
    int conn = (int)sys3(SYS_socket, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (conn < 0)
        return -1;
    address.family = AF_UNIX;
    *put(address.path, path, n) = 0;
    long done;
    do
        done = sys3(SYS_connect, conn, (long)&address, (long)(2 + n + 1));
    while (done == -EINTR);
    /* blocking again: the waiter's fds 0 and 1 will share this file's flags */
    if (done < 0 || sys3(SYS_fcntl, conn, F_SETFL, 0) < 0 || !trusted(conn, path)) {
        sys3(SYS_close, conn, 0, 0);
        return -1;
    }
    return conn;
}

/* The request, framed: "<length>\n" then each argument and a NUL (wire.frame(encode_request)).
 * Built from offset 8 of `buffer` with the head put right before it; its start, or 0 if it
 * does not fit. */
static char *request(char *buffer, long argc, char **argv, size_t *size)
{
    char *end = buffer + 8;
    for (long i = 1; i < argc; i++) {
        size_t n = length(argv[i]) + 1;
        if ((size_t)(end - buffer - 8) + n > MAX_PAYLOAD)
            return 0;
        end = put(end, argv[i], n);
    }
    char head[8], *h = put_number(head, (unsigned long)(end - buffer - 8));
    *h++ = '\n';
    char *start = buffer + 8 - (h - head);
    put(start, head, (size_t)(h - head));
    *size = (size_t)(end - start);
    return start;
}

static int send_request(int conn, const char *p, size_t n, int listen_fd)
{
    union { char bytes[CMSG_HEAD + 8]; unsigned long align; } control;
    struct iovec iov = { (void *)p, n };
    struct msghdr msg = { 0, 0, &iov, 1, 0, 0, 0 };
    if (listen_fd >= 0) { /* cmsghdr: len = CMSG_LEN(4), SOL_SOCKET, SCM_RIGHTS, the fd */
        *(unsigned long *)control.bytes = CMSG_HEAD + 4;
        ((int *)control.bytes)[2] = SOL_SOCKET;
        ((int *)control.bytes)[3] = SCM_RIGHTS;
        ((int *)control.bytes)[4] = listen_fd;
        msg.control = control.bytes;
        msg.controllen = sizeof control.bytes;
    }
    while (n) {
        long done = sys3(SYS_sendmsg, conn, (long)&msg, MSG_NOSIGNAL);
        if (done == -EINTR)
            continue;
        if (done <= 0)
            return 0;
        iov.base = (char *)iov.base + done; /* the rest, if any, without the fd */
        iov.len = n -= (size_t)done;
        msg.control = 0;
        msg.controllen = 0;
    }
    return 1;
}

struct pollfd { int fd; short events, revents; };

/* The stop signals, still blocked, as a descriptor that becomes readable when one is pending:
 * how the door hears a stop while it waits for the engine's answer without a handler of its
 * own (and a handler needs a restorer, and makes every system call interruptible). */
static int stop_signals(void)
{
    unsigned long set = (1UL << (SIGINT - 1)) | (1UL << (SIGTERM - 1));
    return (int)sys5(SYS_signalfd4, -1, (long)&set, 8, SFD_CLOEXEC, 0);
}

/* A stop came after the request went out, as handover._stop_now: the engine may hold the port
 * for us already, so ask it to release, read its answer to EOF (STOP_TIMEOUT_MS for each
 * read), exit 0. Without this, an engine that accepted but never answers (stopped, wedged)
 * would leave the door unkillable but by SIGKILL, and dockerd, which waits for the process it
 * interrupted, with it. */
static __attribute__((noreturn)) void stop_now(int conn)
{
    char sink[256];
    sys5(SYS_sendto, conn, (long)"stop\n", 5, MSG_NOSIGNAL, 0);
    for (;;) {
        struct pollfd one = { conn, POLLIN, 0 };
        if (sys3(SYS_poll, (long)&one, 1, STOP_TIMEOUT_MS) <= 0
            || sys3(SYS_read, conn, (long)sink, sizeof sink) <= 0)
            exit_group(0); /* answered (EOF), or no answer in time: gone either way */
    }
}

/* Until the connection has something to read: then 1; a stop signal first: stop_now(). */
static int readable(int conn, int stops)
{
    for (;;) {
        struct pollfd two[2] = { { stops, POLLIN, 0 }, { conn, POLLIN, 0 } };
        long n = sys3(SYS_poll, (long)two, 2, -1);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return 1; /* let the read say what is wrong */
        if (two[0].revents)
            stop_now(conn);
        if (two[1].revents)
            return 1;
    }
}

/* Read the reply frame into `buffer` (MAX_PAYLOAD + 16 bytes), collecting the fds that come
 * with it into held[] (*count of them); a stop signal meanwhile ends the door (stop_now). Its
 * payload, with *size set; 0 if the connection ended first or the bytes are not a frame
 * (wire.unframe). */
static char *reply(int conn, int stops, char *buffer, size_t *size, int *held, int *count)
{
    union { char bytes[CMSG_HEAD + 4 * MAX_HELD]; unsigned long align; } control;
    size_t got = 0;
    for (;;) {
        readable(conn, stops);
        struct iovec iov = { buffer + got, MAX_PAYLOAD + 16 - got };
        struct msghdr msg = { 0, 0, &iov, 1, control.bytes, sizeof control.bytes, 0 };
        long n = sys3(SYS_recvmsg, conn, (long)&msg, 0);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return 0;
        for (size_t at = 0; at + CMSG_HEAD <= msg.controllen;) {
            size_t len = *(unsigned long *)(control.bytes + at);
            int *words = (int *)(control.bytes + at);
            if (len < CMSG_HEAD || at + len > msg.controllen)
                break;
            if (words[2] == SOL_SOCKET && words[3] == SCM_RIGHTS)
                for (size_t i = 0; i < (len - CMSG_HEAD) / 4; i++) {
                    if (*count < MAX_HELD)
                        held[(*count)++] = words[4 + i];
                    else { /* more than any reply carries: not a reply then */
                        sys3(SYS_close, words[4 + i], 0, 0);
                        *count = MAX_HELD + 1;
                    }
                }
            at += (len + 7) & ~7UL;
        }
        if (n == 0 || *count > MAX_HELD)
            return 0;
        got += (size_t)n;
        size_t end = 0, value = 0;
        while (end < got && end <= MAX_DIGITS && buffer[end] != '\n') {
            if (buffer[end] < '0' || buffer[end] > '9')
                return 0;
            value = value * 10 + (size_t)(buffer[end++] - '0');
        }
        if (end > MAX_DIGITS || (end < got && (end == 0 || value > MAX_PAYLOAD)))
            return 0;
        if (end < got && got - end - 1 >= value) {
            *size = value;
            return buffer + end + 1;
        }
        if (got == MAX_PAYLOAD + 16)
            return 0;
    }
}

/* The waiter's title, as handover.waiter_argv makes it: "pyproxy-wait " and the body's lines
 * joined by ", " (the engine's lines end in "\n" only). */
static void title(char *to, const char *body, size_t n)
{
    to = put(to, "pyproxy-wait", 12);
    if (n)
        *to++ = ' ';
    for (size_t i = 0; i < n; i++) {
        if (body[i] != '\n')
            *to++ = body[i];
        else if (i + 1 < n)
            to = put(to, ", ", 2);
    }
    *to = 0;
}

__attribute__((noreturn, used)) void door_main(long argc, char **argv, char **envp)
{
    /* SIGPIPE ignored, as CPython has it: a write to a reader that went away (fd 1, or the
     * waiter's "0\n" on fd 3 after dockerd gave up) fails with EPIPE instead of ending the
     * process by the signal, and the waiter, which keeps what is ignored across the exec,
     * behaves the same whichever of us exec'd it. (struct sigaction as the kernel takes it:
     * handler, flags, restorer, mask.) */
    unsigned long ignore[4] = { SIG_IGN, 0, 0, 0 };
    sys5(SYS_rt_sigaction, SIGPIPE, (long)ignore, 0, 8, 0);
    /* fd 3 and fd 4 as our parent left them, before anything here opens a descriptor. */
    int mode = mode_of(STATUS_FD);
    int attached = mode == S_IFIFO || mode == S_IFSOCK;
    int listen_fd = mode_of(LISTEN_FD) == S_IFSOCK ? LISTEN_FD : -1;
    const char *path;
    if (!plain_registration(argc, argv) || !(path = engine_path(envp)))
        fall_back(argv, envp, attached);

    char buffer[MAX_PAYLOAD + 16];
    size_t size;
    char *frame = request(buffer, argc, argv, &size);
    int conn = frame ? connect_engine(path) : -1;
    if (conn < 0)
        fall_back(argv, envp, attached);
    int wanted = 0; /* any spelling of -use-listen-fd, even =false (the engine closes it) */
    for (long i = 1; i < argc; i++)
        wanted |= flag_in(argv[i], LISTEN_FD_FLAGS);
    int held[MAX_HELD + 1], count = 0;
    char *body = 0;
    int stops = stop_signals();
    if (stops < 0) { /* no signalfd: Python, whose handler hears a stop */
        sys3(SYS_close, conn, 0, 0);
        fall_back(argv, envp, attached);
    }
    if (send_request(conn, frame, size, wanted ? listen_fd : -1))
        body = reply(conn, stops, buffer, &size, held, &count);
    sys3(SYS_close, stops, 0, 0); /* a pending stop stays pending, for whoever comes next */
    if (!body || size < 2 || body[0] != '0' || body[1] != '\n') {
        /* the engine refused, or went away: Python registers again and says why */
        for (int i = 0; i < count && i < MAX_HELD; i++)
            sys3(SYS_close, held[i], 0, 0);
        sys3(SYS_close, conn, 0, 0);
        fall_back(argv, envp, attached);
    }
    body += 2;
    size -= 2;

    if (size) { /* the `docker port` lines, as hand_over prints them */
        body[size] = '\n';
        write_all(1, body, size + 1);
    }
    if (listen_fd >= 0)
        set_cloexec(listen_fd, 1); /* the engine sent back its copy, among the held */
    if (attached)
        set_cloexec(STATUS_FD, 0); /* the waiter answers "0\n" once its handler is set */
    sys3(SYS_dup2, conn, 0, 0);
    sys3(SYS_dup2, conn, 1, 0);
    set_cloexec(0, 0); /* in case the connection was fd 0 or 1 itself */
    set_cloexec(1, 0);

    /* [title, "ready" | "-", and with sockets held the command that re-attaches:
     *  <dir>/pyproxy -engine-reattach=FD,FD,... argv[1:]] */
    char name[2 * MAX_PAYLOAD + 16], pyproxy[PATH_MAX];
    char reattach[32 + 12 * MAX_HELD], *r = put(reattach, "-engine-reattach=", 17);
    char *args[argc + 4];
    title(name, body, size);
    args[0] = name;
    args[1] = attached ? "ready" : "-";
    long n = 2;
    if (count) {
        beside_me(pyproxy, "pyproxy", attached);
        for (int i = 0; i < count; i++) {
            if (i)
                *r++ = ',';
            r = put_number(r, (unsigned long)held[i]);
        }
        *r = 0;
        args[n++] = pyproxy;
        args[n++] = reattach;
        for (long i = 1; i < argc; i++)
            args[n++] = argv[i];
    }
    args[n] = 0;
    fail(attached, "cannot run the waiter ", "/proc/self/exe",
         sys3(SYS_execve, (long)"/proc/self/exe", (long)args, (long)envp));
}
