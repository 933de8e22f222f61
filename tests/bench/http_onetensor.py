#!/usr/bin/python3
"""A diagnostic bucket for tests/bench/run_http_bench.sh: one complete anchor
holding a single BF16 tensor (`model.embed_tokens.weight`, rows x 1024) of about
--bytes, written like tests/bench/make_model.py writes its anchors.

    http_onetensor.py OUT [--bytes 1192135280] [--seed 0]

dwsfs reads ahead within the tensor being read only, so a whole-file read of a
model made of many tensors smaller than a block (Qwen3-0.6B: 2-6 MiB each but
the embedding) never gets a readahead window; this file has no tensor ends.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import dwsgen as g  # noqa: E402
import gen_bucket as gb  # noqa: E402
import make_model as mm  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--bytes", type=int, default=1192135280)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} exists and is not empty")
    rows = max(1, a.bytes // (2 * 1024))
    params = [(g.EMBED, (rows, 1024))]
    meta = g.trainer_metadata(1, False, 1, rows * 1024, rows * 1024)
    rng = np.random.default_rng(a.seed)
    n = mm.write_streaming(os.path.join(out, "anchors", gb.step_file(1)), params, meta,
                           lambda k: mm.random_bf16(rng, k), gb.T0_NS)
    print(f"anchor_bytes={n}")


if __name__ == "__main__":
    sys.exit(main())
