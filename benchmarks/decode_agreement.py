"""Per-row cosine between features extracted with ``--decode pil`` and ``--decode torch`` of
the same images, for every store under a folder (as extract_throughput.py leaves them).

    python benchmarks/decode_agreement.py /tmp/bob-gpu/bench
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bob_cache.stores import open_store


def main() -> None:
    for store in sorted(Path(sys.argv[1]).glob("store-*")):
        sets = {
            fs.attrs["spec"]["preprocessing"]["decode"].split(".")[0]: fs
            for fs in open_store(store).feature_sets()
        }
        if not {"PIL", "torchvision"} <= set(sets):
            continue
        a = sets["PIL"].features[:].astype(np.float64)
        b = sets["torchvision"].features[:].astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        print(
            f"{store.name}: decode torch vs pil cosine min {np.nanmin(cos):.5f} median "
            f"{np.nanmedian(cos):.5f} over {len(cos)} rows"
        )


if __name__ == "__main__":
    main()
