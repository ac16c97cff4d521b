/*
 * parkway fn: check and print function specs (runtime/pw_spec.h).
 *
 *     parkway fn validate FILE|DIR...   "ok NAME (FILE)" per spec on stdout; each error as
 *                                        one line on stderr; exit 2 on any bad spec
 *     parkway fn show FILE              the canonical JSON the spec is stored as
 *
 * A directory is read as pw_spec_load_dir() reads it (*.yaml and *.yml, sorted, names
 * unique). Names must also be unique across all the arguments, since they are meant to be
 * deployed together. Single-threaded; runs and exits.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "parkway_cli.h"
#include "pw_err.h"
#include "pw_spec.h"

#define FN_ERRCAP 1024

static void fn_usage(FILE *f)
{
    fputs("usage: parkway fn validate FILE|DIR...\n"
          "       parkway fn show FILE\n"
          "\n"
          "validate  check function specs (YAML); prints \"ok NAME (FILE)\" for each good\n"
          "          one, and one line FILE:LINE:COL: KEY: MESSAGE for each error\n"
          "show      print a spec as the canonical JSON parkway stores\n",
          f);
}

/* Keeps the worse of two exit codes (2, bad input, outranks 1). */
static int worse(int rc, int other)
{
    return other > rc ? other : rc;
}

/* Adds specs to all; reports a name already there. Takes ownership of the specs in set. */
static int fn_collect(struct pw_spec_set *all, struct pw_spec_set *set)
{
    int rc = 0;
    struct pw_spec **grown = realloc(all->specs, (all->count + set->count + 1) * sizeof *grown);
    if (!grown) {
        fprintf(stderr, "parkway fn: out of memory\n");
        pw_spec_set_deinit(set);
        return 1;
    }
    all->specs = grown;
    for (size_t i = 0; i < set->count; i++) {
        struct pw_spec *s = set->specs[i];
        const struct pw_spec *prev = pw_spec_set_find(all, s->name);
        if (prev) {
            fprintf(stderr, "%s:%u:%u: name: duplicate function name '%s' (also in %s)\n",
                    s->origin, (unsigned)s->name_mark.line, (unsigned)s->name_mark.col, s->name,
                    prev->origin);
            rc = 2;
        } else {
            printf("ok %s (%s)\n", s->name, s->origin);
        }
        all->specs[all->count++] = s;
    }
    free(set->specs);
    set->specs = NULL;
    set->count = 0;
    return rc;
}

static int fn_validate(int argc, char **argv)
{
    struct pw_spec_set all = {0};
    char errbuf[FN_ERRCAP];
    int rc = 0;

    if (argc < 2) {
        fn_usage(stderr);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        struct pw_spec_set set = {0};
        struct stat st;
        enum pw_err err;
        if (stat(argv[i], &st) == 0 && S_ISDIR(st.st_mode)) {
            err = pw_spec_load_dir(argv[i], &set, errbuf, sizeof errbuf);
            if (!err && set.count == 0) {
                fprintf(stderr, "%s:1:1: (document): no function specs (*.yaml, *.yml) here\n",
                        argv[i]);
                rc = worse(rc, 2);
                continue;
            }
        } else {
            struct pw_spec *s = NULL;
            err = pw_spec_load_file(argv[i], &s, errbuf, sizeof errbuf);
            if (!err) {
                set.specs = malloc(sizeof *set.specs);
                if (!set.specs) {
                    pw_spec_destroy(s);
                    fprintf(stderr, "parkway fn: out of memory\n");
                    rc = worse(rc, 1);
                    continue;
                }
                set.specs[0] = s;
                set.count = 1;
            }
        }
        if (err) {
            fprintf(stderr, "%s\n", errbuf);
            rc = worse(rc, pw_err_exit_code(err));
            continue;
        }
        rc = worse(rc, fn_collect(&all, &set));
    }
    pw_spec_set_deinit(&all);
    fflush(stdout);
    return rc;
}

static int fn_show(int argc, char **argv)
{
    struct pw_spec *s = NULL;
    char errbuf[FN_ERRCAP];
    char *json = NULL;
    int rc = 0;

    if (argc != 2) {
        fn_usage(stderr);
        return 2;
    }
    enum pw_err err = pw_spec_load_file(argv[1], &s, errbuf, sizeof errbuf);
    if (err) {
        fprintf(stderr, "%s\n", errbuf);
        rc = pw_err_exit_code(err);
        goto out;
    }
    json = pw_spec_to_json(s);
    if (!json) {
        fprintf(stderr, "parkway fn: out of memory\n");
        rc = 1;
        goto out;
    }
    printf("%s\n", json);
    if (fflush(stdout) != 0)
        rc = 1;
out:
    free(json);
    pw_spec_destroy(s);
    return rc;
}

int parkway_cmd_fn(int argc, char **argv)
{
    if (argc < 2) {
        fn_usage(stderr);
        return 2;
    }
    const char *sub = argv[1];
    if (strcmp(sub, "validate") == 0)
        return fn_validate(argc - 1, argv + 1);
    if (strcmp(sub, "show") == 0)
        return fn_show(argc - 1, argv + 1);
    if (strcmp(sub, "help") == 0 || strcmp(sub, "-h") == 0 || strcmp(sub, "--help") == 0) {
        fn_usage(stdout);
        return 0;
    }
    fprintf(stderr, "parkway fn: unknown command '%s'\n", sub);
    fn_usage(stderr);
    return 2;
}
