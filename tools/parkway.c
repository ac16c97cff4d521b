/*
 * parkway: the command-line front door. Dispatches `parkway <command> ...` to the
 * subcommand functions declared in parkway_cli.h. Single-threaded.
 */
#include "parkway_cli.h"

#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "pw_log.h"

struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
};

static const struct command commands[] = {
    {"up", parkway_cmd_up, "run the whole stack on this machine"},
    {"fn", parkway_cmd_fn, "validate, show, list (ls) or tail (events) functions"},
    {"keys", parkway_cmd_keys, "create, list or revoke API keys"},
    {"batch", parkway_cmd_batch, "offline batch jobs (Files and Batches APIs)"},
    {"simulate", parkway_cmd_simulate, "replay a request trace against scaling policies"},
};

static char exe_dir[PATH_MAX] = ".";

const char *parkway_exe_dir(void)
{
    return exe_dir;
}

static void usage(FILE *out)
{
    fprintf(out, "usage: parkway <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(out, "  %-10s %s\n", "version", "print the version");
    fprintf(out, "\nparkway <command> --help for a command's options.\n");
}

int main(int argc, char **argv)
{
    pw_log_init_from_env();
    ssize_t n = readlink("/proc/self/exe", exe_dir, sizeof exe_dir - 1);
    if (n > 0) {
        exe_dir[n] = '\0';
        char *slash = strrchr(exe_dir, '/');
        if (slash)
            *slash = '\0';
    } else {
        strcpy(exe_dir, ".");
    }

    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("parkway %s\n", PARKWAY_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].run(argc - 1, argv + 1);
    }
    fprintf(stderr, "parkway: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
