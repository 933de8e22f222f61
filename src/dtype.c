/* Dtype names, sizes and the exact BF16 conversions of the format spec. */
#include "internal.h"

#include <string.h>

static const struct {
	const char *name;
	size_t size;
} dtypes[DWS_DT_COUNT] = {
	[DWS_DT_BOOL] = {"BOOL", 1},       [DWS_DT_U8] = {"U8", 1},
	[DWS_DT_I8] = {"I8", 1},           [DWS_DT_F8_E5M2] = {"F8_E5M2", 1},
	[DWS_DT_F8_E4M3] = {"F8_E4M3", 1}, [DWS_DT_I16] = {"I16", 2},
	[DWS_DT_U16] = {"U16", 2},         [DWS_DT_F16] = {"F16", 2},
	[DWS_DT_BF16] = {"BF16", 2},       [DWS_DT_I32] = {"I32", 4},
	[DWS_DT_U32] = {"U32", 4},         [DWS_DT_F32] = {"F32", 4},
	[DWS_DT_I64] = {"I64", 8},         [DWS_DT_U64] = {"U64", 8},
	[DWS_DT_F64] = {"F64", 8},
};

dws_dtype dws_dtype_parse(const char *s)
{
	for (int i = 1; i < DWS_DT_COUNT; i++)
		if (strcmp(dtypes[i].name, s) == 0)
			return (dws_dtype)i;
	return DWS_DT_INVALID;
}

const char *dws_dtype_name(dws_dtype dt)
{
	return dt > 0 && dt < DWS_DT_COUNT ? dtypes[dt].name : "?";
}

size_t dws_dtype_size(dws_dtype dt)
{
	return dt > 0 && dt < DWS_DT_COUNT ? dtypes[dt].size : 0;
}

float dws_bf16_to_f32(uint16_t b)
{
	uint32_t u = (uint32_t)b << 16;
	float f;
	memcpy(&f, &u, 4);
	return f;
}

uint16_t dws_f32_to_bf16(float f)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40); /* quiet NaN, keep sign */
	u += 0x7fffu + ((u >> 16) & 1);
	return (uint16_t)(u >> 16);
}

/* BF16 has 8 exponent bits and 7 mantissa bits; F16 has 5 and 10. Every BF16
 * value is an F32 value, so this is F32 -> F16 round-to-nearest-even,
 * specialised to inputs whose low 16 bits are zero. */
uint16_t dws_bf16_to_f16(uint16_t b)
{
	uint32_t sign = (uint32_t)(b & 0x8000u);
	uint32_t exp = (b >> 7) & 0xffu;
	uint32_t man = b & 0x7fu;

	if (exp == 0xff) /* inf or NaN */
		return (uint16_t)(sign | 0x7c00u | (man ? 0x200u | (man << 3) : 0));
	int32_t e = (int32_t)exp - 127 + 15; /* F16 biased exponent */
	if (e >= 0x1f)
		return (uint16_t)(sign | 0x7c00u); /* overflow */
	if (e >= 1)  /* normal: 7 mantissa bits fit in 10, exact */
		return (uint16_t)(sign | ((uint32_t)e << 10) | (man << 3));
	if (exp == 0)
		return (uint16_t)sign; /* BF16 zero/subnormal (< 2^-126): rounds to 0 */
	/* F16 subnormal: value = full * 2^(exp-134) with full = 1.man as an 8-bit
	 * integer; in units of 2^-24 that is full * 2^(exp-110). exp <= 112 here. */
	uint32_t full = 0x80u | man;
	int32_t shift = 110 - (int32_t)exp;
	if (shift <= 0)
		return (uint16_t)(sign | (full << -shift));
	if (shift >= 9)
		return (uint16_t)sign; /* below half the smallest subnormal */
	uint32_t q = full >> shift;
	uint32_t rem = full & ((1u << shift) - 1);
	uint32_t half = 1u << (shift - 1);
	if (rem > half || (rem == half && (q & 1)))
		q++;
	return (uint16_t)(sign | q); /* q may carry into the exponent: still right */
}

uint16_t dws_f16_to_bf16(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
	uint32_t u;
	if (exp == 0x1f) {
		u = sign | 0x7f800000u | (man << 13);
	} else if (exp == 0) {
		if (!man) {
			u = sign;
		} else { /* normalise the subnormal */
			int e = -1;
			do {
				man <<= 1;
				e++;
			} while (!(man & 0x400u));
			u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
		}
	} else {
		u = sign | ((exp - 15 + 127) << 23) | (man << 13);
	}
	float f;
	memcpy(&f, &u, 4);
	return dws_f32_to_bf16(f);
}

bool dws_dtype_is_float(dws_dtype d)
{
	return d == DWS_DT_BF16 || d == DWS_DT_F16 || d == DWS_DT_F32;
}
