"""Every export format of one merged qalora model (and of its adapter), written and measured:
bytes on disk, bits per model parameter, and the size relative to the qalora checkpoint.

    python benchmarks/export_sizes.py --pipeline /work/runs/pipeline

``--pipeline`` is a ``qalora pipeline`` folder (``quantized/``, ``adapter/``, ``merged/``). The
exports go to ``--work`` (a temporary folder by default) and are deleted afterwards unless
``--keep``. Prints a table and writes ``benchmarks/results/export_sizes.json``. Correctness of
each format is checked elsewhere (tests/export/, benchmarks/gguf_llamacpp.py, mlx_check.py,
adapter_export_check.py); this script only writes and weighs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "export_sizes.json"


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_parameters(ckpt: Path) -> int:
    """Weights of the model (quantized layers counted by their logical shape, everything else as stored)."""
    from safetensors import safe_open

    meta = json.loads((ckpt / "qalora.json").read_text())
    n = sum(s["out_features"] * s["in_features"] for s in meta["layers"].values())
    quant = {f"{m}.{p}" for m in meta["layers"] for p in ("qweight", "scale", "offset")}
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k not in quant and not k.endswith(".bias"):
                shape = f.get_slice(k).get_shape()
                count = 1
                for d in shape:
                    count *= d
                n += count
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True, help="a qalora pipeline folder (quantized/, adapter/, merged/)")
    p.add_argument("--work", default=None, help="where the exports are written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the exports")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT.parent / "src"))
    from qalora.export.gguf import export_gguf
    from qalora.export.gguf_lora import export_gguf_lora
    from qalora.export.mlx import export_mlx
    from qalora.export.peft import export_peft
    from qalora.export.torchao import export_torchao

    run = Path(args.pipeline)
    merged, quantized, adapter = run / "merged", run / "quantized", run / "adapter"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="export-sizes-"))
    work.mkdir(parents=True, exist_ok=True)
    params = model_parameters(merged)
    meta = json.loads((merged / "qalora.json").read_text())
    spec = next(iter(meta["layers"].values()))
    jobs = [
        ("qalora checkpoint", "qalora", None, lambda out: shutil.copytree(merged, out)),
        ("gguf", "llama.cpp (Q4_1)", "model.gguf", lambda out: export_gguf(merged, out, progress=False)),
        ("mlx float16", "mlx-lm", "mlx16", lambda out: export_mlx(merged, out, progress=False)),
        ("mlx float32", "mlx-lm", "mlx32", lambda out: export_mlx(merged, out, dtype="float32", progress=False)),
        ("torchao unpacked", "transformers + torchao", "torchao", lambda out: export_torchao(merged, out, progress=False)),
        ("torchao packed", "transformers + torchao (prototype int4, this CPU kind)", "torchao-packed",
         lambda out: export_torchao(merged, out, layout="packed", progress=False)),
        ("peft adapter", "PEFT (unmerged, over the dense base)", "peft",
         lambda out: export_peft(adapter, out, model=quantized, base_out=work / "peft-base", progress=False)),
        ("peft dense base", "transformers (fp32)", "peft-base", None),
        ("gguf-lora adapter", "llama.cpp --lora (unmerged)", "adapter.gguf",
         lambda out: export_gguf_lora(adapter, out, model=quantized, progress=False)),
    ]
    rows = []
    for label, runtime, name, write in jobs:
        out = merged if name is None else work / name
        t0 = time.time()
        if write is not None and name is not None:
            write(out)
        size = folder_bytes(out)
        rows.append({"format": label, "runtime": runtime, "bytes": size, "seconds": round(time.time() - t0, 1),
                     "bits_per_parameter": round(8 * size / params, 3)})
    base = rows[0]["bytes"]
    for r in rows:
        r["vs_checkpoint"] = round(r["bytes"] / base, 3)
    print(f"model {merged} (INT{spec['bits']} g{spec['group_size']}), {params:,} parameters")
    print(f"{'format':<20} {'MB':>9} {'bits/param':>10} {'x ckpt':>7}  runtime")
    for r in rows:
        print(f"{r['format']:<20} {r['bytes'] / 1e6:>9.1f} {r['bits_per_parameter']:>10.2f} {r['vs_checkpoint']:>7.3f}  "
              f"{r['runtime']}")
    result = {"model": str(merged), "bits": spec["bits"], "group_size": spec["group_size"], "parameters": params,
              "rows": rows, "command": "python benchmarks/export_sizes.py --pipeline " + str(run)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
