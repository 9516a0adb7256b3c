"""Collect the merge_report.json of merged checkpoints into one table (+ JSON).

    python benchmarks/merge_reports.py pipe4-m2 pipe3b-m2 pipe2/merged

Each folder is the output of ``qalora merge`` (or the ``merged/`` stage of ``qalora pipeline``).
Prints, per model: bits/group, weight error in ulps, the fp64 merge error against the fp32
storage floor, the fp32 error against the fp32 noise floor, and the int4 (bf16) figures; writes
``benchmarks/results/merge_reports.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qalora.checkpoint import read_meta
from qalora.merging.command import REPORT_FILE

OUT = Path(__file__).parent / "results" / "merge_reports.json"


def row(folder: Path) -> dict:
    report = json.loads((folder / REPORT_FILE).read_text())
    meta = read_meta(folder)
    ref, i4 = report["reference"], report.get("int4") or {}
    return {"model": str(folder), "bits": meta.get("bits"), "group_size": meta.get("group_size"),
            "method": meta.get("method"), "layers_merged": report["layers_merged"],
            "max_weight_err_ulps": report["weights"]["max_weight_err_ulps"],
            "fp64_max_abs_logit_diff": report.get("fp64_max_abs_logit_diff"),
            "fp32_storage_floor": report.get("fp32_storage_floor"),
            "fp32_max_abs_logit_diff": ref["max_abs_logit_diff"], "fp32_noise_floor": report.get("fp32_noise_floor"),
            "fp32_top1": ref["top1_agreement"], "int4_max_abs_logit_diff": i4.get("max_abs_logit_diff"),
            "int4_top1": i4.get("top1_agreement"), "n_tokens": ref["n_tokens"],
            "codes_and_scales_unchanged": report["codes_and_scales_unchanged"]}


def _e(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args()
    rows = [row(f) for f in args.folders]
    print("| model | INT/g | weights (ulp) | fp64 err | storage floor | fp32 err | noise floor | int4 max | int4 top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bits']}/{r['group_size']} {r['method']} | {r['max_weight_err_ulps']:.2f} | "
              f"{_e(r['fp64_max_abs_logit_diff'])} | {_e(r['fp32_storage_floor'])} | {_e(r['fp32_max_abs_logit_diff'])} | "
              f"{_e(r['fp32_noise_floor'])} | {_e(r['int4_max_abs_logit_diff'])} | {r['int4_top1']:.3f} |")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
