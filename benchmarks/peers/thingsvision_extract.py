"""Peer benchmark: feature-extraction throughput of thingsvision on a folder of images.

Run with the thingsvision venv's python (see setup_thingsvision.sh), e.g.::

    python thingsvision_extract.py --folder DIR --model resnet18 --module global_pool \
        --batch-size 64 --threads 2 --workers 0

It measures what a thingsvision user gets end to end on CPU: JPEG decoding and the model's
transforms (``extractor.get_transformations()``, applied per image with PIL in
``thingsvision.utils.data.ImageDataset``), batching, the forward pass and the forward-hook capture
of ``--module`` in ``extractor.extract_features``. Weights are random (``pretrained=False``):
throughput does not depend on them. One untimed warm-up batch runs first; then the full folder is
extracted ``--repeat`` times and the fastest run is reported.

thingsvision's own ``DataLoader`` has no worker processes, so ``--workers 0`` uses it and
``--workers N`` wraps the same ``ImageDataset`` in a ``torch.utils.data.DataLoader`` with N
workers (``"loader"`` in the output says which). ``extract_features`` itself draws one extra
batch before extracting (``ImageOnlyDataloaderModifier`` probes the loader's output format); that
is part of the tool's cost and is included in the timing.

stdout gets exactly one JSON line; thingsvision's own prints, tqdm and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True, help="flat folder or ImageFolder tree of images")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--source", default="timm", help="thingsvision model source")
    p.add_argument("--module", default="global_pool", help="module whose output is extracted")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--repeat", type=int, default=1, help="timed runs; the fastest is reported")
    return p.parse_args(argv)


def make_loader(dataset: Any, batch_size: int, workers: int) -> Iterable[Any]:
    """thingsvision's own loader, or a torch DataLoader when worker processes are asked for."""
    if workers == 0:
        from thingsvision.utils.data import DataLoader

        return DataLoader(dataset=dataset, batch_size=batch_size, backend="pt")
    import torch.utils.data

    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not os.path.isdir(args.folder):
        raise SystemExit(f"not a directory: {args.folder}")
    import torch

    torch.set_num_threads(args.threads)

    import thingsvision
    from thingsvision import get_extractor
    from thingsvision.utils.data import ImageDataset

    extractor = get_extractor(
        model_name=args.model, source=args.source, pretrained=False, device="cpu"
    )
    transforms = extractor.get_transformations()
    print(f"transforms: {transforms}")

    def extract(batches: Iterable[Any]) -> Any:
        return extractor.extract_features(
            batches=batches, module_name=args.module, flatten_acts=True, output_type="ndarray"
        )

    # ImageDataset writes the extraction order to <out_path>/file_names.txt; keep that out of
    # the image folder and the repo.
    with tempfile.TemporaryDirectory(prefix="tv-order-") as out_path:
        dataset = ImageDataset(
            root=args.folder, out_path=out_path, backend="pt", transforms=transforms
        )
        n = len(dataset)
        if n == 0:
            raise SystemExit(f"no images found under {args.folder}")

        warm = torch.utils.data.Subset(dataset, range(min(args.batch_size, n)))
        extract(make_loader(warm, args.batch_size, args.workers))

        loader = make_loader(dataset, args.batch_size, args.workers)
        runs: list[float] = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            features = extract(loader)
            runs.append(time.perf_counter() - t0)
            if features.shape[0] != n:
                raise RuntimeError(f"extracted {features.shape[0]} rows for {n} images")
        print(f"features: {features.shape} {features.dtype}; runs (s): {runs}")

    seconds = min(runs)
    return {
        "tool": "thingsvision",
        "version": thingsvision.__version__,
        "model": args.model,
        "module": args.module,
        "images": n,
        "seconds": round(seconds, 4),
        "images_per_second": round(n / seconds, 2),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "workers": args.workers,
        "loader": "thingsvision" if args.workers == 0 else "torch DataLoader",
        "seconds_all": [round(s, 4) for s in runs],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # thingsvision prints progress to stdout; keep stdout for the single JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
