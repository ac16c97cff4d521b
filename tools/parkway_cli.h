/*
 * parkway CLI: one function per subcommand, dispatched by tools/parkway.c.
 * Each takes argv with argv[0] = the subcommand name and returns the process exit code
 * (0 success, 2 bad input or configuration, 1 other failure). Results go to stdout,
 * diagnostics to stderr.
 */
#ifndef PARKWAY_CLI_H
#define PARKWAY_CLI_H

/* parkway up: the whole stack on this machine (tools/parkway_up.c). */
int parkway_cmd_up(int argc, char **argv);

/* parkway fn validate|show: function specs (tools/parkway_fn.c). */
int parkway_cmd_fn(int argc, char **argv);

/* parkway keys create|list|revoke: API keys (tools/parkway_keys.c). */
int parkway_cmd_keys(int argc, char **argv);

/* parkway batch submit|status|list|cancel|results: batch jobs (tools/parkway_batch.c). */
int parkway_cmd_batch(int argc, char **argv);

/* parkway simulate: replay a request trace against scaling policies (tools/parkway_simulate.c,
 * declared with the simulator in scaler/scaler_sim.h). */
int parkway_cmd_simulate(int argc, char **argv);

/* Directory holding the running `parkway` executable (no trailing slash); "." if unknown. */
const char *parkway_exe_dir(void);

#endif
