"""Export a qalora checkpoint to MLX (float16 and float32) and run it in mlx-lm, against qalora.

mlx-lm runs in its own interpreter (a venv, so this one's packages stay pinned)::

    python -m venv /work/mlxenv && /work/mlxenv/bin/pip install "mlx[cpu]==0.32.4" "mlx-lm==0.32.2"
    python benchmarks/mlx_check.py --model /work/runs/pipeline/merged

For each export: whether mlx-lm loads it (and tokenizes like the HF tokenizer), a greedy chat
reply next to qalora's, mlx-lm's decode speed, and its next-token logits on the two passages
of ``gguf_llamacpp.py`` against qalora's fp32 reference kernel (top-1 agreement, mean and max
|Δlogit|). The fp32 noise floor row is qalora's own fp32 reference logits against the same model
in fp64: how far fp32 arithmetic alone moves these logits, the level a float32 export should
reach. The folder size is compared with the Q4_1 GGUF of the same model (``--gguf``, or the
124,904,160-byte pipeline GGUF when none is given). Prints a table and writes
``benchmarks/results/mlx.json``.

Runs on MLX's CPU backend here (no Apple GPU): its float16 quantized matmuls have no native CPU
kernel and run ~30x slower than float32 (one 40-token forward of the embedded model: 190 s vs
9 s on 2 shared cores), so the float16 half takes ~15 min and the decode speeds printed say
nothing about Apple silicon, where float16 is MLX's fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gguf_llamacpp import TEXTS  # the same two held-out passages as the GGUF check

GGUF_Q4_1_BYTES = 124_904_160  # the pipeline's Q4_1 GGUF of the merged INT3 g32 model (README)
DTYPES = ("float16", "float32")

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    mx.set_default_device(mx.cpu)
    folders, texts, ids, prompt, dest = (json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]),
                                         sys.argv[4], sys.argv[5])
    arrays, info = {}, {}
    for name, folder in folders.items():
        t = time.perf_counter()
        model, tok = load(folder)
        load_s = time.perf_counter() - t
        for i, seq in enumerate(ids):
            arrays[f"{name}|{i}"] = np.array(model(mx.array([seq]))[0].astype(mx.float32))
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        reply, last = "", None
        for last in stream_generate(model, tok, chat, max_tokens=32):
            reply += last.text
        info[name] = {"load_seconds": load_s, "same_tokens": [tok.encode(x) == s for x, s in zip(texts, ids)],
                      "reply": reply, "generation_tps": last.generation_tps, "generated_tokens": last.generation_tokens,
                      "dtype": str(model.model.embed_tokens.weight.dtype)}
    import mlx_lm
    np.savez(dest, **arrays)
    print(json.dumps({"folders": info, "versions": {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}}))
""")


def run_mlx(python: str, folders: dict[str, Path], ids: list[list[int]], prompt: str,
            work: Path) -> tuple[dict, dict, dict]:
    """``(per folder: load seconds, tokenization, chat reply, decode speed; versions; logits)``."""
    import numpy as np

    dest = work / "mlx_logits.npz"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([python, "-c", CHILD, json.dumps({k: str(v) for k, v in folders.items()}), json.dumps(TEXTS),
                        json.dumps(ids), prompt, str(dest)], check=False, capture_output=True, text=True, env=env,
                       timeout=1200)
    if r.returncode != 0:
        raise SystemExit(f"mlx-lm failed:\n{r.stderr[-3000:]}")
    with np.load(dest) as npz:
        logits = {k: torch.from_numpy(npz[k]) for k in npz.files}
    found = json.loads(r.stdout.strip().splitlines()[-1])
    return found["folders"], found["versions"], logits


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()
    return {"positions": a.shape[0], "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
            "mean_abs_diff": float(d.mean()), "max_abs_diff": float(d.max())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="/work/runs/pipeline/merged", help="qalora checkpoint (quantized or merged)")
    p.add_argument("--gguf", default=None, help="the Q4_1 GGUF of the same model (default: model.gguf beside "
                                                "--model if present, else the pipeline's 124,904,160 bytes)")
    p.add_argument("--mlx-python", default="/work/mlxenv/bin/python", help="interpreter with mlx and mlx-lm")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--work", default=None, help="folder for the exports (default: a temporary one)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mlx.json"))
    args = p.parse_args()

    import qalora
    from qalora.export.mlx import export_mlx
    from qalora.merging.verify import float64

    model_dir = Path(args.model)
    if model_dir.name == "merged" and not (model_dir / "merge_report.json").is_file():
        raise SystemExit(f"{model_dir}/merge_report.json is missing: the merge is not finished")
    gguf = Path(args.gguf) if args.gguf else model_dir.parent / "model.gguf"
    gguf_bytes, gguf_source = (gguf.stat().st_size, str(gguf)) if gguf.is_file() else \
        (GGUF_Q4_1_BYTES, "pipeline Q4_1 GGUF (README figure)")
    work = Path(args.work or tempfile.mkdtemp(prefix="mlx_check-"))
    work.mkdir(parents=True, exist_ok=True)

    exports = {}
    for dtype in DTYPES:
        t = time.perf_counter()
        exports[dtype] = export_mlx(model_dir, work / f"mlx-{dtype}", dtype=dtype, progress=False)
        exports[dtype]["export_seconds"] = time.perf_counter() - t

    model, tok = qalora.load_model_and_tokenizer(model_dir, kernel="reference")
    ids = [tok(text)["input_ids"] for text in TEXTS]
    with torch.no_grad():
        ref32 = [model(torch.tensor([s])).logits[0] for s in ids]
        with float64(model):
            ref64 = [model(torch.tensor([s])).logits[0] for s in ids]
    ours = qalora.generate(model, tok, args.prompt, max_new_tokens=32, chat=True)

    info, versions, logits = run_mlx(args.mlx_python, {d: work / f"mlx-{d}" for d in DTYPES}, ids, args.prompt, work)
    rows = [{"dtype": "qalora fp32 vs fp64 (noise floor)", "passage": i + 1, **compare(ref32[i], ref64[i])}
            for i in range(len(ids))]
    for dtype in DTYPES:
        for i in range(len(ids)):
            rows.append({"dtype": dtype, "passage": i + 1, **compare(logits[f"{dtype}|{i}"], ref32[i]),
                         "max_abs_diff_vs_fp64": float((logits[f"{dtype}|{i}"].double() - ref64[i]).abs().max())})

    sizes = {d: {"folder_bytes": exports[d]["folder_bytes"], "weights_bytes": exports[d]["weights_bytes"],
                 "vs_gguf": exports[d]["folder_bytes"] / gguf_bytes} for d in DTYPES}
    q = exports["float16"]["quantization"]
    print(f"model {model_dir} (int{q['bits']} g{q['group_size']}, {exports['float16']['quantized_layers']} layers); "
          f"mlx-lm {info['float16']['dtype']} / {info['float32']['dtype']}")
    print(f"{'export':<34} {'passage':>7} {'positions':>9} {'top-1':>7} {'mean|Δ|':>9} {'max|Δ|':>9}")
    for r in rows:
        print(f"{r['dtype']:<34} {r['passage']:>7} {r['positions']:>9} {100 * r['top1']:>6.1f}% "
              f"{r['mean_abs_diff']:>9.3g} {r['max_abs_diff']:>9.3g}")
    print(f"{'export':<10} {'folder':>12} {'vs GGUF Q4_1':>13} {'loads':>6} {'same tokens':>12} {'decode tok/s':>13}")
    for d in DTYPES:
        print(f"{d:<10} {sizes[d]['folder_bytes']:>12,} {sizes[d]['vs_gguf']:>12.3f}x {'yes':>6} "
              f"{all(info[d]['same_tokens'])!s:>12} {info[d]['generation_tps']:>13.1f}")
    print(f"GGUF Q4_1: {gguf_bytes:,} bytes ({gguf_source})")
    for d in DTYPES:
        print(f"mlx-lm {d} chat: {info[d]['reply']!r}")
    print(f"qalora chat:         {ours!r}")

    result = {"model": str(model_dir), "prompt": args.prompt, "gguf_bytes": gguf_bytes, "gguf_source": gguf_source,
              "quantization": q, "rows": rows, "sizes": sizes, "mlx": info, "qalora_reply": ours,
              "export": {d: {k: exports[d][k] for k in ("max_abs_error", "max_rel_error", "files", "export_seconds")}
                         for d in DTYPES},
              "versions": {**versions, "qalora_torch": torch.__version__, "mlx_python": args.mlx_python}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
