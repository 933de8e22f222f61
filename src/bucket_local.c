/* The local-folder bucket: the embedded default and what tests use. */
#include "bucket.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define LOCAL_MAX_OBJECTS (10u * 1000 * 1000)
#define LOCAL_MAX_DEPTH 32

struct local {
	int dirfd;
};

static int walk(int dirfd, const char *rel, dws_objvec *ov, int depth,
		const char *root, dws_error *err)
{
	if (depth > LOCAL_MAX_DEPTH)
		return dws_fail(err, DWS_EFORMAT, "%s/%s: folders nested deeper than %d", root, rel, LOCAL_MAX_DEPTH);
	/* the root opened anew, not dup()ed: a dup shares the file offset, and
	 * a second listing of the root would start where the first ended */
	int fd = openat(dirfd, *rel ? rel : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return dws_fail(err, DWS_EIO, "%s/%s: cannot open folder: %s", root, rel, strerror(errno));
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return dws_fail(err, DWS_EIO, "%s/%s: cannot read folder: %s", root, rel, strerror(errno));
	}
	int rc = DWS_OK;
	struct dirent *de;
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.' && (!de->d_name[1] || (de->d_name[1] == '.' && !de->d_name[2])))
			continue;
		char *key = *rel ? dws_xasprintf("%s/%s", rel, de->d_name) : dws_xstrdup(de->d_name);
		struct stat st;
		if (fstatat(dirfd, key, &st, 0) != 0) {
			free(key); /* a dangling link or a file that just went away */
			continue;
		}
		if (S_ISDIR(st.st_mode)) {
			rc = walk(dirfd, key, ov, depth + 1, root, err);
			free(key);
			if (rc)
				break;
			continue;
		}
		if (!S_ISREG(st.st_mode) || !dws_key_is_safe(key)) {
			free(key);
			continue;
		}
		dws_object *o = dws_objvec_push(ov, LOCAL_MAX_OBJECTS);
		if (!o) {
			free(key);
			rc = dws_fail(err, DWS_EFORMAT, "%s: more than %u objects", root, LOCAL_MAX_OBJECTS);
			break;
		}
		o->key = key;
		o->size = (uint64_t)st.st_size;
		o->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
		snprintf(o->ident, sizeof(o->ident), "local:%llu:%llu:%lld.%09ld", (unsigned long long)st.st_ino,
			 (unsigned long long)st.st_size, (long long)st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
	}
	closedir(d);
	return rc;
}

static int local_list(dws_bucket *b, const char *prefix, dws_object **out,
		      size_t *n, dws_error *err)
{
	struct local *l = b->priv;
	dws_objvec ov = {0};
	char *rel = dws_xstrdup(prefix);
	size_t rl = strlen(rel);
	while (rl && rel[rl - 1] == '/')
		rel[--rl] = 0;
	int rc = DWS_OK;
	if (*rel && !dws_key_is_safe(rel)) {
		rc = dws_fail(err, DWS_EINVAL, "%s: prefix '%s' is not a safe relative path", b->uri, prefix);
	} else {
		struct stat st;
		if (*rel && (fstatat(l->dirfd, rel, &st, 0) != 0 || !S_ISDIR(st.st_mode)))
			rc = DWS_OK; /* an absent prefix lists nothing */
		else
			rc = walk(l->dirfd, rel, &ov, 0, b->uri, err);
	}
	free(rel);
	if (rc) {
		dws_objects_free(ov.v, ov.n);
		return rc;
	}
	dws_objects_sort(ov.v, ov.n);
	*out = ov.v;
	*n = ov.n;
	return DWS_OK;
}

static int local_open_blob(dws_bucket *b, const dws_object *obj, dws_blob **out,
			   dws_error *err)
{
	struct local *l = b->priv;
	int fd = openat(l->dirfd, obj->key, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return dws_fail(err, errno == ENOENT ? DWS_ENOENT : DWS_EIO, "%s/%s: cannot open: %s", b->uri, obj->key, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return dws_fail(err, DWS_EIO, "%s/%s: not a regular file", b->uri, obj->key);
	}
	char *name = dws_xasprintf("%s/%s", b->uri, obj->key);
	*out = dws_blob_from_fd(name, fd, (uint64_t)st.st_size);
	dws_blob_count_into(*out, b->fetched);
	free(name);
	return DWS_OK;
}

static void local_close(dws_bucket *b)
{
	struct local *l = b->priv;
	close(l->dirfd);
	free(l);
	free(b->uri);
	free(b);
}

static const struct dws_bucket_ops local_ops = {
	.list = local_list, .open_blob = local_open_blob, .close = local_close,
};

int dws_bucket_local_open(const char *path, dws_bucket **out, dws_error *err)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return dws_fail(err, errno == ENOENT ? DWS_ENOENT : DWS_EIO, "%s: cannot open the folder: %s", path, strerror(errno));
	dws_bucket *b = dws_xcalloc(1, sizeof(*b));
	struct local *l = dws_xcalloc(1, sizeof(*l));
	l->dirfd = fd;
	b->ops = &local_ops;
	b->priv = l;
	b->fetched = dws_fetch_count_new();
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/')
		n--;
	b->uri = dws_xasprintf("%.*s", (int)n, path);
	*out = b;
	return DWS_OK;
}
