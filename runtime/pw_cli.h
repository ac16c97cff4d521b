/*
 * pw_cli: small helpers the process front ends (engine, router, scaler, parkway) share for
 * options and identities. Pure or read-only; thread-safe.
 */
#ifndef PW_CLI_H
#define PW_CLI_H

#include <stdbool.h>
#include <stddef.h>

/* Parses a whole decimal unsigned integer in [0, max]; false for anything else ("", "-1",
 * "12x", overflow). The caller prints its own message naming the option. */
bool pw_cli_parse_uint(const char *s, unsigned long long max, unsigned long long *out);

/* "<hostname>-<pid>" with every character outside [A-Za-z0-9.-] of the host name replaced
 * by '-', so it is a valid key-name part (pw_key_name_ok); fallback is used when the host
 * name cannot be read. */
void pw_cli_host_pid_id(char *buf, size_t cap, const char *fallback);

/* rel resolved against the directory of the running executable ("<dir>/<rel>") into out.
 * False, with out = rel, when /proc/self/exe cannot be read or the path does not fit. */
bool pw_cli_exe_rel(char *out, size_t cap, const char *rel);

#endif
