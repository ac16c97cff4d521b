/*
 * pw_test_proc: processes, files and time for integration tests that run the project's
 * binaries (scaler, engine, router, gguf-gen) as real child processes.
 *
 * Children get PR_SET_PDEATHSIG, so a crashed test leaves nothing running. Helpers that
 * cannot go on (a file that cannot be written, a command that fails) fail the cmocka test
 * or exit the program, as each function says. Single-threaded test helpers.
 */
#ifndef PW_TEST_PROC_H
#define PW_TEST_PROC_H

#include <stddef.h>
#include <sys/types.h>

/* Sleeps ms milliseconds. */
void pw_test_sleep_ms(int ms);

/* A TCP port on 127.0.0.1 that was free a moment ago (bind to :0), or -1. Another process
 * may take it before the caller binds it: retry on EADDRINUSE where that matters. */
int pw_test_free_port(void);

/* Runs cmd through the shell; exits the program with 1 (after saying which command) when it
 * does not exit 0. For setup steps without which nothing can be tested. */
void pw_test_run_or_die(const char *cmd);

/* Writes text to path, replacing it; fails the test when it cannot. */
void pw_test_write_file(const char *path, const char *text);

/* The value of environment variable name when set and not empty, else dflt. */
const char *pw_test_env_or(const char *name, const char *dflt);

/*
 * Writes a generated model to out with the parkway-gguf-gen at gen and args (its flags,
 * e.g. "--shape tiny --type q8_0"); exits the program with 1 when that fails.
 */
void pw_test_gguf_gen_at(const char *gen, const char *out, const char *args);

/* The binaries of this build tree. The library is built without PW_BINARY_DIR, the test
 * programs with it: these expand in the test. */
#ifdef PW_BINARY_DIR
#define PW_TEST_SCALER_BIN PW_BINARY_DIR "/scaler/parkway-scaler"
#define PW_TEST_GGUF_GEN_BIN PW_BINARY_DIR "/tools/gguf-gen/parkway-gguf-gen"
/* The parkway-engine tests run: PW_TEST_ENGINE when set, else this build tree's. */
#define pw_test_engine_path()                                                                      \
    pw_test_env_or("PW_TEST_ENGINE", PW_BINARY_DIR "/engine/parkway-engine")
/* pw_test_gguf_gen_at with this build tree's parkway-gguf-gen. */
#define pw_test_gguf_gen(out, args) pw_test_gguf_gen_at(PW_TEST_GGUF_GEN_BIN, (out), (args))
#endif

/*
 * Starts argv[0] (a path) with argv, stdout and stderr appended to log (both left on the
 * terminal when PW_TEST_VERBOSE is set). death_sig is sent to the child if the test process
 * dies (SIGTERM lets it clean up its own children, SIGKILL does not wait). Returns the pid.
 */
pid_t pw_test_spawn(char *const argv[], const char *log, int death_sig);

/*
 * Sends SIGTERM and waits up to timeout_ms for pid to exit, then SIGKILLs and reaps it.
 * Returns its exit code, 128 + signal when a signal ended it, or -1 when it had to be
 * killed.
 */
int pw_test_stop(pid_t pid, int timeout_ms);

/* Removes the directory tree dir (best effort). A no-op for "". */
void pw_test_rmtree(const char *dir);

/* pw_test_rmtree, unless PW_TEST_KEEP is set: then it says it kept dir. */
void pw_test_rmtree_unless_keep(const char *dir);

#endif
