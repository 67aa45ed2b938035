/* qlora launch: one process per rank of a data-parallel run on this host,
 * with the environment torchrun gives its workers (core/dist.h). */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

enum { OPT_HELP = 256, OPT_NPROC, OPT_PORT, OPT_ADDR };

/* SIGINT and SIGTERM to the launcher, passed on to every rank one for one
 * (the ranks have a process group of their own, so a Ctrl-C on the
 * terminal reaches them through here only: a second one stops them at once,
 * as it does one `qlora train`) */
static volatile sig_atomic_t signals_got, last_signal;

static void on_signal(int sig)
{
    last_signal = sig;
    signals_got++;
}

static int help_launch(void)
{
    printf("usage: qlora launch --nproc N [OPTIONS] train TRAIN_OPTIONS...\n\n"
           "Data-parallel training on this host: N processes of `qlora train`, each with WORLD_SIZE, RANK,\n"
           "LOCAL_RANK, MASTER_ADDR and MASTER_PORT set as torchrun sets them. Each rank runs --grad-accum\n"
           "micro-batches of --batch-size per step, so a step sees N times as many examples as one process;\n"
           "the gradients are added up, every rank takes the same optimizer step, and rank 0 alone writes\n"
           "the run folder. Under another launcher (torchrun, srun, mpirun) set those variables and run\n"
           "`qlora train` directly (docs/training.md). If a rank fails, the others are stopped (SIGTERM,\n"
           "then SIGKILL after 30 s) and launch exits with that rank's status. On the CPU only so far:\n"
           "the GPU's communicator (NCCL) is not built yet.\n\n"
           "options:\n");
    help_opt("--nproc N", "processes (ranks) to start, 1 to 64 (also --gpus)", NULL);
    help_opt("--master-addr ADDR", "where rank 0 listens", "127.0.0.1");
    help_opt("--master-port PORT", "rank 0's TCP port", "a free port");
    return help_end("qlora launch --nproc 2 train --model ../shared/models/stories260K --data ../shared/data/alpaca/"
                    "alpaca_en_demo.json --output run-dp --device cpu --steps 20 --grad-accum 8");
}

/* a TCP port of 127.0.0.1 that is free now (the kernel's pick) */
static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK), .sin_port = 0};
    socklen_t len = sizeof a;
    int port = -1;
    if (!bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &len))
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static void describe(char *buf, size_t cap, int status)
{
    if (WIFEXITED(status)) snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status)) snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else snprintf(buf, cap, "stopped (status %d)", status);
}

int cmd_launch(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"help", no_argument, NULL, OPT_HELP},          {"nproc", required_argument, NULL, OPT_NPROC},
        {"gpus", required_argument, NULL, OPT_NPROC},   {"master-port", required_argument, NULL, OPT_PORT},
        {"master-addr", required_argument, NULL, OPT_ADDR}, {NULL, 0, NULL, 0},
    };
    long nproc = 0, port = 0;
    const char *addr = "127.0.0.1";
    int c, bad = 0;
    optind = 1;
    /* "+": the options end at the command (train's own follow it) */
    while ((c = getopt_long(argc, argv, "+:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'h':
        case OPT_HELP: return help_launch();
        case OPT_NPROC: bad |= parse_long_arg("--nproc", optarg, 1, 64, &nproc); break;
        case OPT_PORT: bad |= parse_long_arg("--master-port", optarg, 1, 65535, &port); break;
        case OPT_ADDR: addr = optarg; break;
        default: return option_error(c, argv, longopts);
        }
    }
    if (bad) return 2;
    if (nproc < 1) return usage_error("--nproc N is required");
    if (optind >= argc) return usage_error("the command to run is missing (qlora launch --nproc N train ...)");
    if (strcmp(argv[optind], "train"))
        return usage_error("'%s' does not run data parallel: only train does", argv[optind]);
    if (!port && (port = free_port()) < 0) {
        fprintf(stderr, "qlora: launch: no free TCP port on 127.0.0.1: %s (give --master-port)\n", strerror(errno));
        return 1;
    }
    char world_s[16], port_s[16];
    snprintf(world_s, sizeof world_s, "%ld", nproc);
    snprintf(port_s, sizeof port_s, "%ld", port);
    /* the children run this same program: qlora train ARGS */
    char **args = calloc((size_t)(argc - optind + 2), sizeof *args);
    pid_t *pid = calloc((size_t)nproc, sizeof *pid);
    if (!args || !pid) {
        free(args);
        free(pid);
        fprintf(stderr, "qlora: launch: out of memory\n");
        return 1;
    }
    args[0] = (char *)"qlora";
    for (int i = optind; i < argc; i++) args[i - optind + 1] = argv[i];
    struct sigaction sa = {.sa_handler = on_signal}, old_int, old_term;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_int);
    sigaction(SIGTERM, &sa, &old_term);
    fflush(NULL);
    int started = 0, failed_rank = -1, failed_status = 0;
    double kill_at = 0; /* when the ranks told to stop get SIGKILL (0: none told) */
    const pid_t launcher = getpid();
    (void)launcher;
    for (long r = 0; r < nproc; r++) {
        pid_t p = fork();
        if (p == 0) {
            sigaction(SIGINT, &old_int, NULL);
            sigaction(SIGTERM, &old_term, NULL);
            setpgid(0, 0);
#ifdef __linux__
            prctl(PR_SET_PDEATHSIG, SIGTERM); /* a launcher killed outright stops its ranks (they checkpoint) */
            if (getppid() != launcher) _exit(1); /* it died before the line above */
#endif
            char rank_s[16];
            snprintf(rank_s, sizeof rank_s, "%ld", r);
            setenv("WORLD_SIZE", world_s, 1);
            setenv("RANK", rank_s, 1);
            setenv("LOCAL_RANK", rank_s, 1);
            setenv("MASTER_ADDR", addr, 1);
            setenv("MASTER_PORT", port_s, 1);
            execv("/proc/self/exe", args);
            fprintf(stderr, "qlora: launch: rank %ld: cannot run /proc/self/exe: %s\n", r, strerror(errno));
            _exit(127);
        }
        if (p < 0) { /* the ranks started would wait for this one: stopped */
            fprintf(stderr, "qlora: launch: cannot start rank %ld: %s\n", r, strerror(errno));
            failed_rank = (int)r;
            failed_status = 1 << 8;
            for (long k = 0; k < r; k++) kill(pid[k], SIGTERM);
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            kill_at = (double)now.tv_sec + 1e-9 * (double)now.tv_nsec + 30;
            break;
        }
        pid[r] = p;
        started++;
    }
    /* wait for every rank; the first that fails stops the others */
    int left = started;
    sig_atomic_t forwarded = 0;
    while (left > 0) {
        while (forwarded < signals_got) {
            for (long r = 0; r < nproc; r++)
                if (pid[r] > 0) kill(pid[r], last_signal);
            forwarded++;
        }
        int status;
        pid_t p = waitpid(-1, &status, WNOHANG);
        if (p < 0 && errno != EINTR) break;
        if (p <= 0) {
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            double t = (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
            if (kill_at > 0 && t > kill_at) {
                for (long r = 0; r < nproc; r++)
                    if (pid[r] > 0) kill(pid[r], SIGKILL);
                kill_at = 0;
            }
            struct timespec ts = {.tv_sec = 0, .tv_nsec = 20 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        long r = 0;
        while (r < nproc && pid[r] != p) r++;
        if (r == nproc) continue;
        pid[r] = 0;
        left--;
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok && failed_rank < 0) {
            failed_rank = (int)r;
            failed_status = status;
            for (long k = 0; k < nproc; k++)
                if (pid[k] > 0) kill(pid[k], SIGTERM);
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            kill_at = (double)now.tv_sec + 1e-9 * (double)now.tv_nsec + 30;
        }
    }
    sigaction(SIGINT, &old_int, NULL);
    sigaction(SIGTERM, &old_term, NULL);
    free(args);
    free(pid);
    if (failed_rank < 0) return 0;
    char how[96];
    describe(how, sizeof how, failed_status);
    if (signals_got)
        fprintf(stderr, "qlora: launch: %s, passed on to every rank; rank %d of %ld %s\n",
                last_signal == SIGINT ? "interrupted (SIGINT)" : "stopped (SIGTERM)", failed_rank, nproc, how);
    else
        fprintf(stderr, "qlora: launch: rank %d of %ld %s%s\n", failed_rank, nproc, how,
                nproc > 1 ? "; the other ranks were stopped" : "");
    if (WIFEXITED(failed_status)) return WEXITSTATUS(failed_status) ? WEXITSTATUS(failed_status) : 1;
    return WIFSIGNALED(failed_status) ? 128 + WTERMSIG(failed_status) : 1;
}
