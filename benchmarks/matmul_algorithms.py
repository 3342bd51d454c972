"""What the timed cuBLASLt algorithm choice found: for every product saved in the cache folder's
algorithm files (nanollm.kernels.matmul_tuning), the heuristic's first answer's time, the chosen
answer's, and the gain. Reads files only: run it after a training run with
NANOLLM_MATMUL_ALGORITHM=timed (the default) has timed its products.

    python benchmarks/matmul_algorithms.py [--folder DIR]
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanollm.kernels import matmul_tuning  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=matmul_tuning.cache_folder(), help="the cache folder")
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.folder, "cublaslt-algorithms-*.json")))
    if not paths:
        raise SystemExit(f"no cuBLASLt algorithm files in {args.folder}")
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        print(f"{path}: {data.get('device')}")
        print("| product | answers | first (ms) | chosen | chosen (ms) | gain |")
        print("|---|---|---|---|---|---|")
        first_total = chosen_total = 0.0
        for name, choice in sorted(data["choices"].items()):
            ms = choice.get("ms") or []
            first, chosen = (ms[0] if ms else None), (ms[choice["index"]] if len(ms) > choice["index"] else None)
            gain = f"{100 * (1 - chosen / first):.1f}%" if first and chosen else "n/a"
            if first and chosen:
                first_total, chosen_total = first_total + first, chosen_total + chosen
            config = choice["config"]
            label = f"#{choice['index']} (tile {config.get('TILE_ID')}, stages {config.get('STAGES_ID')}, " \
                    f"split-K {config.get('SPLITK_NUM')})"
            print(f"| {name} | {len(ms)} | {first} | {label} | {chosen} | {gain} |")
        if first_total:
            print(f"one call of each: {first_total:.3f} ms with the first answers, {chosen_total:.3f} ms chosen "
                  f"({100 * (1 - chosen_total / first_total):.1f}% less)")


if __name__ == "__main__":
    main()
