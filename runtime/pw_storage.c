/*
 * pw_storage: the interface dispatch and the local-directory implementation.
 *
 * Local layout: <root>/<id> for each object; a writer streams into <root>/.tmp-<id>-<rand>,
 * fsyncs it, then rename(2)s it over <root>/<id> and fsyncs the directory, so a reader sees
 * either the old object or the whole new one, and a crash leaves at most a .tmp file (ids
 * never start with '.', so temporaries never collide with objects).
 * Ids are checked here too (safe names, no leading '.'), so no id can escape the root.
 */
#include "pw_storage.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pw_keyspace.h"

/* ---- dispatch ------------------------------------------------------------------------ */

struct pw_storage_writer {
    struct pw_storage *s;
};

struct pw_storage_reader {
    struct pw_storage *s;
};

static bool id_ok(const char *id)
{
    return pw_key_name_ok(id) && id[0] != '.';
}

enum pw_err pw_storage_open(const char *where, struct pw_storage **out, char *err, size_t errcap)
{
    if (!where || !out)
        return PW_ERR_INVAL;
    *out = NULL;
    if (strncmp(where, "file://", 7) == 0)
        return pw_storage_local_create(where + 7, out, err, errcap);
    if (strstr(where, "://")) {
        snprintf(err, errcap, "storage %s: unknown scheme (use a directory or file:///dir)", where);
        return PW_ERR_CONFIG;
    }
    return pw_storage_local_create(where, out, err, errcap);
}

void pw_storage_destroy(struct pw_storage *s)
{
    if (s)
        s->ops->destroy(s);
}

enum pw_err pw_storage_writer_open(struct pw_storage *s, const char *id,
                                   struct pw_storage_writer **out)
{
    if (!s || !out || !id_ok(id))
        return PW_ERR_INVAL;
    return s->ops->writer_open(s, id, out);
}

enum pw_err pw_storage_write(struct pw_storage_writer *wr, const void *data, size_t len)
{
    if (!wr)
        return PW_ERR_INVAL;
    return len ? wr->s->ops->write(wr, data, len) : PW_OK;
}

enum pw_err pw_storage_commit(struct pw_storage_writer *wr)
{
    if (!wr)
        return PW_ERR_INVAL;
    return wr->s->ops->commit(wr);
}

void pw_storage_abort(struct pw_storage_writer *wr)
{
    if (wr)
        wr->s->ops->abort(wr);
}

enum pw_err pw_storage_put(struct pw_storage *s, const char *id, const void *data, size_t len)
{
    struct pw_storage_writer *wr = NULL;
    enum pw_err e = pw_storage_writer_open(s, id, &wr);
    if (e)
        return e;
    if ((e = pw_storage_write(wr, data, len))) {
        pw_storage_abort(wr);
        return e;
    }
    return pw_storage_commit(wr);
}

enum pw_err pw_storage_reader_open(struct pw_storage *s, const char *id, uint64_t *size_out,
                                   struct pw_storage_reader **out)
{
    if (!s || !out || !id_ok(id))
        return PW_ERR_INVAL;
    return s->ops->reader_open(s, id, size_out, out);
}

enum pw_err pw_storage_read(struct pw_storage_reader *rd, void *buf, size_t cap, size_t *n_out)
{
    if (!rd || !n_out)
        return PW_ERR_INVAL;
    return rd->s->ops->read(rd, buf, cap, n_out);
}

enum pw_err pw_storage_read_at(struct pw_storage_reader *rd, uint64_t off, void *buf, size_t cap,
                               size_t *n_out)
{
    if (!rd || !n_out)
        return PW_ERR_INVAL;
    *n_out = 0;
    if (!rd->s->ops->read_at)
        return PW_ERR_UNSUPPORTED;
    return rd->s->ops->read_at(rd, off, buf, cap, n_out);
}

void pw_storage_reader_close(struct pw_storage_reader *rd)
{
    if (rd)
        rd->s->ops->reader_close(rd);
}

enum pw_err pw_storage_get(struct pw_storage *s, const char *id, size_t max, char **out,
                           size_t *len_out)
{
    if (!out || !len_out)
        return PW_ERR_INVAL;
    *out = NULL;
    *len_out = 0;
    uint64_t size = 0;
    struct pw_storage_reader *rd = NULL;
    enum pw_err e = pw_storage_reader_open(s, id, &size, &rd);
    if (e)
        return e;
    char *buf = NULL;
    size_t have = 0;
    if (size > max) {
        e = PW_ERR_TOOBIG;
        goto out;
    }
    buf = malloc((size_t)size + 1);
    if (!buf) {
        e = PW_ERR_NOMEM;
        goto out;
    }
    /* The object may have been replaced since open; read what this reader sees. */
    for (;;) {
        size_t n = 0;
        if ((e = pw_storage_read(rd, buf + have, (size_t)size - have, &n)))
            goto out;
        if (n == 0 || have + n == size) {
            have += n;
            break;
        }
        have += n;
    }
    buf[have] = '\0';
    *out = buf;
    *len_out = have;
    buf = NULL;
out:
    free(buf);
    pw_storage_reader_close(rd);
    return e;
}

enum pw_err pw_storage_delete(struct pw_storage *s, const char *id)
{
    if (!s || !id_ok(id))
        return PW_ERR_INVAL;
    return s->ops->remove(s, id);
}

/* ---- local directory ----------------------------------------------------------------- */

struct local {
    char root[PATH_MAX - 200]; /* no trailing slash */
};

struct local_writer {
    struct pw_storage_writer base;
    int fd;
    char tmp[PATH_MAX];
    char final[PATH_MAX];
};

struct local_reader {
    struct pw_storage_reader base;
    int fd;
};

static enum pw_err errno_err(int e)
{
    switch (e) {
    case ENOENT:
        return PW_ERR_NOTFOUND;
    case ENOMEM:
        return PW_ERR_NOMEM;
    case EACCES:
    case EPERM:
        return PW_ERR_DENIED;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:
        return PW_ERR_TOOBIG;
    default:
        return PW_ERR_IO;
    }
}

static enum pw_err local_writer_open(struct pw_storage *s, const char *id,
                                     struct pw_storage_writer **out)
{
    struct local *l = s->impl;
    struct local_writer *w = calloc(1, sizeof *w);
    if (!w)
        return PW_ERR_NOMEM;
    uint64_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd)
        rnd = (uint64_t)getpid() ^ (uint64_t)(uintptr_t)w;
    snprintf(w->tmp, sizeof w->tmp, "%s/.tmp-%s-%016llx", l->root, id, (unsigned long long)rnd);
    snprintf(w->final, sizeof w->final, "%s/%s", l->root, id);
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (w->fd < 0) {
        enum pw_err e = errno_err(errno);
        free(w);
        return e == PW_ERR_NOTFOUND ? PW_ERR_IO : e;
    }
    w->base.s = s;
    *out = &w->base;
    return PW_OK;
}

static enum pw_err local_write(struct pw_storage_writer *wr, const void *data, size_t len)
{
    struct local_writer *w = (struct local_writer *)wr;
    const char *p = data;
    while (len > 0) {
        ssize_t n = write(w->fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno_err(errno);
        }
        p += n;
        len -= (size_t)n;
    }
    return PW_OK;
}

static void local_abort(struct pw_storage_writer *wr)
{
    struct local_writer *w = (struct local_writer *)wr;
    close(w->fd);
    unlink(w->tmp);
    free(w);
}

static enum pw_err local_commit(struct pw_storage_writer *wr)
{
    struct local_writer *w = (struct local_writer *)wr;
    struct local *l = w->base.s->impl;
    enum pw_err e = PW_OK;
    if (fsync(w->fd) != 0 || close(w->fd) != 0) {
        e = errno_err(errno);
        w->fd = -1;
        unlink(w->tmp);
        free(w);
        return e;
    }
    if (rename(w->tmp, w->final) != 0) {
        e = errno_err(errno);
        unlink(w->tmp);
    } else {
        int dfd = open(l->root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    free(w);
    return e;
}

static enum pw_err local_reader_open(struct pw_storage *s, const char *id, uint64_t *size_out,
                                     struct pw_storage_reader **out)
{
    struct local *l = s->impl;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", l->root, id);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno_err(errno);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return PW_ERR_NOTFOUND;
    }
    struct local_reader *r = calloc(1, sizeof *r);
    if (!r) {
        close(fd);
        return PW_ERR_NOMEM;
    }
    r->fd = fd;
    r->base.s = s;
    if (size_out)
        *size_out = (uint64_t)st.st_size;
    *out = &r->base;
    return PW_OK;
}

static enum pw_err local_read(struct pw_storage_reader *rd, void *buf, size_t cap, size_t *n_out)
{
    struct local_reader *r = (struct local_reader *)rd;
    *n_out = 0;
    if (cap == 0)
        return PW_OK;
    for (;;) {
        ssize_t n = read(r->fd, buf, cap);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno_err(errno);
        *n_out = (size_t)n;
        return PW_OK;
    }
}

static enum pw_err local_read_at(struct pw_storage_reader *rd, uint64_t off, void *buf, size_t cap,
                                 size_t *n_out)
{
    struct local_reader *r = (struct local_reader *)rd;
    size_t have = 0;
    if (off > (uint64_t)INT64_MAX)
        return PW_ERR_RANGE;
    /* pread may return short counts; loop so only the end of the object gives fewer. */
    while (have < cap) {
        ssize_t n = pread(r->fd, (char *)buf + have, cap - have, (off_t)(off + have));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno_err(errno);
        if (n == 0)
            break;
        have += (size_t)n;
    }
    *n_out = have;
    return PW_OK;
}

static void local_reader_close(struct pw_storage_reader *rd)
{
    struct local_reader *r = (struct local_reader *)rd;
    close(r->fd);
    free(r);
}

static enum pw_err local_remove(struct pw_storage *s, const char *id)
{
    struct local *l = s->impl;
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", l->root, id);
    if (unlink(path) != 0)
        return errno_err(errno);
    return PW_OK;
}

static void local_destroy(struct pw_storage *s)
{
    free(s->impl);
    free(s);
}

static const struct pw_storage_ops local_ops = {
    .name = "local",
    .writer_open = local_writer_open,
    .write = local_write,
    .commit = local_commit,
    .abort = local_abort,
    .reader_open = local_reader_open,
    .read = local_read,
    .reader_close = local_reader_close,
    .remove = local_remove,
    .destroy = local_destroy,
    .read_at = local_read_at,
};

/* mkdir -p with mode 0700 for the directories it creates. */
static int mkdir_p(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        int rc = mkdir(path, 0700);
        *p = '/';
        if (rc != 0 && errno != EEXIST)
            return -1;
    }
    if (mkdir(path, 0700) != 0 && errno != EEXIST)
        return -1;
    return 0;
}

enum pw_err pw_storage_local_create(const char *dir, struct pw_storage **out, char *err,
                                    size_t errcap)
{
    if (!dir || !dir[0] || !out)
        return PW_ERR_INVAL;
    struct local *l = calloc(1, sizeof *l);
    struct pw_storage *s = calloc(1, sizeof *s);
    if (!l || !s) {
        free(l);
        free(s);
        return PW_ERR_NOMEM;
    }
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    if (n >= sizeof l->root) {
        snprintf(err, errcap, "storage directory path is too long");
        free(l);
        free(s);
        return PW_ERR_CONFIG;
    }
    memcpy(l->root, dir, n);
    l->root[n] = '\0';
    struct stat st;
    if (mkdir_p(l->root) != 0 || stat(l->root, &st) != 0 || !S_ISDIR(st.st_mode) ||
        access(l->root, W_OK | X_OK) != 0) {
        snprintf(err, errcap, "storage directory %s: %s", l->root, strerror(errno));
        free(l);
        free(s);
        return PW_ERR_CONFIG;
    }
    s->ops = &local_ops;
    s->impl = l;
    *out = s;
    return PW_OK;
}
