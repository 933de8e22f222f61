/* How steps are named, in a bucket (anchors/step_000012.safetensors) and in
 * a mount (steps/000012): at least six digits, more past 999999 without
 * leading zeros, never past 2^63-1 (the largest a JSON reader takes as an
 * integer: the status, dwsctl wait). The one place this rule lives. */
#include "internal.h"

#include <string.h>

static const char pre[] = "step_", suf[] = ".safetensors";

bool dws_parse_step_dir(const char *name, uint64_t *step)
{
	size_t n = strlen(name);
	if (n < 6 || n > 19 || (n > 6 && name[0] == '0'))
		return false;
	return dws_parse_u64(name, step) && *step <= INT64_MAX;
}

void dws_step_dir_name(uint64_t step, char *buf, size_t len)
{
	snprintf(buf, len, "%06llu", (unsigned long long)step);
}

bool dws_parse_step_name(const char *base, uint64_t *step, bool *zst)
{
	size_t n = strlen(base), pl = strlen(pre), sl = strlen(suf);
	if (strncmp(base, pre, pl) != 0)
		return false;
	*zst = n > 4 && strcmp(base + n - 4, ".zst") == 0;
	if (*zst)
		n -= 4;
	if (n < pl + sl || strncmp(base + n - sl, suf, sl) != 0)
		return false;
	char num[24];
	size_t digits = n - pl - sl;
	if (digits >= sizeof(num))
		return false;
	memcpy(num, base + pl, digits);
	num[digits] = 0;
	return dws_parse_step_dir(num, step);
}

char *dws_step_key(uint64_t step, bool anchor, bool zst)
{
	char num[24];
	dws_step_dir_name(step, num, sizeof(num));
	return dws_xasprintf("%s/%s%s%s%s", anchor ? "anchors" : "deltas", pre, num, suf, zst ? ".zst" : "");
}
