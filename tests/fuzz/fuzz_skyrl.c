/* libFuzzer target: SkyRL's manifest.json and a payload file (fuzz_xor.h):
 * the catalog's reading of a version, then its bounded XOR apply and the
 * checksums. */
#include "fuzz_xor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return xor_one(data, size, DWS_FORMAT_SKYRL, "delta-00000001", "manifest.json", "p.safetensors");
}
