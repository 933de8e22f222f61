/* libFuzzer harness shared by fuzz_skyrl and fuzz_miles: the input is a
 * version's manifest (or index) and one payload file, separated by XOR_SEP.
 * They are written into a fresh folder beside a tiny base model (the same
 * one tests/fuzz/make_seeds.py writes its seeds for: XOR_BASE below), as
 * version 1 of the format; the catalog reads the folder with the format
 * forced, and a version it lists is built and read whole.
 *
 * Invariants: a refusal is one line with a negative code; a step that builds
 * reads back every byte of every file without error; nothing leaks or
 * overflows (ASan/UBSan). */
#include "fuzz_common.h"

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#define XOR_SEP "\n--payload--\n"

/* The base: "w" BF16[32,8], "n" F32[8], "i" I64[4]; byte k of the data
 * section is (k * 7 + 3) & 0xff. */
static void write_file(const char *path, const void *p, size_t n)
{
	FILE *f = fopen(path, "wb");
	FUZZ_CHECK(f);
	FUZZ_CHECK(fwrite(p, 1, n, f) == n);
	fclose(f);
}

static void write_base(const char *dir)
{
	static const uint64_t sw[2] = {32, 8}, sn[1] = {8}, si[1] = {4};
	dws_st_out_tensor t[3] = {{"w", DWS_DT_BF16, 2, sw, 512}, {"n", DWS_DT_F32, 1, sn, 32}, {"i", DWS_DT_I64, 1, si, 32}};
	char *hdr = NULL;
	size_t hl = 0;
	dws_error err = {0};
	FUZZ_CHECK(dws_st_build_header(t, 3, NULL, 0, &hdr, &hl, &err) == DWS_OK);
	unsigned char data[576];
	for (size_t k = 0; k < sizeof(data); k++)
		data[k] = (unsigned char)((k * 7 + 3) & 0xff);
	char *path = dws_xasprintf("%s/model.safetensors", dir);
	FILE *f = fopen(path, "wb");
	FUZZ_CHECK(f);
	FUZZ_CHECK(fwrite(hdr, 1, hl, f) == hl && fwrite(data, 1, sizeof(data), f) == sizeof(data));
	fclose(f);
	free(path);
	free(hdr);
}

static int rm_one(const char *p, const struct stat *s, int flag, struct FTW *ftw)
{
	(void)s, (void)flag, (void)ftw;
	return remove(p);
}

static char *xor_root;

static void xor_cleanup(void)
{
	if (xor_root)
		nftw(xor_root, rm_one, 8, FTW_DEPTH | FTW_PHYS);
}

/* One input as version 1 of fmt, in folder (e.g. "delta-00000001") with its
 * index named index and its payload named payload. */
static int xor_one(const uint8_t *data, size_t size, dws_format fmt, const char *folder, const char *index,
		   const char *payload)
{
	if (!xor_root) {
		const char *t = getenv("TMPDIR");
		xor_root = dws_xasprintf("%s/dwsfs-fuzz-xor-%d", t && *t ? t : "/tmp", (int)getpid());
		atexit(xor_cleanup);
		mkdir(xor_root, 0700);
		char *base = dws_xasprintf("%s/base", xor_root);
		mkdir(base, 0700);
		write_base(base);
		free(base);
	}
	const char *root = xor_root;
	char *bucket = dws_xasprintf("%s/bucket", root);
	nftw(bucket, rm_one, 8, FTW_DEPTH | FTW_PHYS);
	mkdir(bucket, 0700);
	char *vdir = dws_xasprintf("%s/%s", bucket, folder);
	mkdir(vdir, 0700);
	const uint8_t *sep = memmem(data, size, XOR_SEP, strlen(XOR_SEP));
	size_t ilen = sep ? (size_t)(sep - data) : size;
	char *ipath = dws_xasprintf("%s/%s", vdir, index), *ppath = dws_xasprintf("%s/%s", vdir, payload);
	write_file(ipath, data, ilen);
	if (sep)
		write_file(ppath, sep + strlen(XOR_SEP), size - ilen - strlen(XOR_SEP));

	dws_bucket *b = NULL;
	dws_catalog *c = NULL;
	dws_builder *bl = NULL;
	dws_step *s = NULL;
	dws_error err = {0};
	FUZZ_CHECK(dws_bucket_open(bucket, &b, &err) == DWS_OK);
	dws_catalog_opts co;
	dws_catalog_opts_init(&co);
	co.format = fmt;
	int rc = dws_catalog_load(b, &co, &c, &err);
	FUZZ_CHECK(rc == DWS_OK);
	FUZZ_CHECK(dws_catalog_count(c) <= 1);
	char *base = dws_xasprintf("%s/base", root);
	dws_build_opts bo;
	dws_build_opts_init(&bo);
	bo.base = base;
	bo.verify = true;
	FUZZ_CHECK(dws_builder_new(c, &bo, &bl, &err) == DWS_OK);
	if (dws_catalog_count(c)) {
		const dws_stepfile *f = dws_catalog_at(c, 0);
		FUZZ_CHECK(f->step == 1);
		rc = dws_builder_build(bl, 1, &s, &err);
		if (rc) {
			fuzz_check_error(rc, &err);
			if (fuzz_verbose())
				fprintf(stderr, "refused: %s\n", err.msg);
		} else {
			unsigned char buf[4096];
			for (size_t i = 0; i < dws_step_file_count(s); i++) {
				const dws_file_info *fi = dws_step_file(s, i);
				for (uint64_t off = 0; off < fi->size; off += sizeof(buf)) {
					dws_error re = {0};
					FUZZ_CHECK(dws_step_read(s, i, off, buf, sizeof(buf), &re) > 0);
				}
			}
		}
	}
	dws_step_unref(s);
	dws_builder_free(bl);
	dws_catalog_free(c);
	dws_bucket_close(b);
	free(base);
	free(ipath);
	free(ppath);
	free(vdir);
	free(bucket);
	return 0;
}
