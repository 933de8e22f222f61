/* libFuzzer target: a miles index and one shard (fuzz_xor.h): the catalog's
 * reading of a version (xor, overwrite or full), then applying it. */
#include "fuzz_xor.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	return xor_one(data, size, DWS_FORMAT_MILES, "weight_v000001", "model.safetensors.index.json", "s.safetensors");
}
