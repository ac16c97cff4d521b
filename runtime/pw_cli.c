/* pw_cli: option parsing and identity helpers shared by the process front ends. */
#include "pw_cli.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

bool pw_cli_parse_uint(const char *s, unsigned long long max, unsigned long long *out)
{
    if (!s || s[0] == '-' || s[0] == '+' || s[0] == ' ')
        return false;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v > max)
        return false;
    *out = v;
    return true;
}

void pw_cli_host_pid_id(char *buf, size_t cap, const char *fallback)
{
    char host[64];
    if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0')
        snprintf(host, sizeof host, "%s", fallback);
    host[sizeof host - 1] = '\0';
    for (char *p = host; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '.'))
            *p = '-';
    snprintf(buf, cap, "%s-%d", host, (int)getpid());
}

bool pw_cli_exe_rel(char *out, size_t cap, const char *rel)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash)
            *slash = '\0';
        int w = snprintf(out, cap, "%s/%s", self, rel);
        if (w >= 0 && (size_t)w < cap)
            return true;
    }
    snprintf(out, cap, "%s", rel);
    return false;
}
