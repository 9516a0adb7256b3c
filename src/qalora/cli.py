"""``qalora`` command line. Options of a config dataclass are generated from its fields, so
defaults are stated once (in ``config.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from qalora.errors import QaloraError


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--field-name`` option per dataclass field, default and help read from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        said = "(default:" in help_  # a default the help states itself (e.g. one per method)
        kind = hints[f.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``X | None``: an optional X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_} (default: {default})")
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=f.name, nargs="*", default=default, help=f"{help_} (default: {' '.join(default)})")
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=default,
                                help=help_ if said else f"{help_} (default: {default})")


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def cmd_quantize(args) -> int:
    from qalora.api import quantize
    from qalora.config import QuantConfig

    config = dataclass_from_args(QuantConfig, args)
    meta = quantize(args.model, args.out, config, progress=not args.quiet)
    r = meta["report"]
    print(f"wrote {args.out}: {len(meta['layers'])} layers quantized to INT{config.bits} g{config.group_size} "
          f"({config.method}) in {r['seconds']:.0f} s; quantized weights {_human(r['quantized_bytes'])} "
          f"({r['bits_per_quantized_weight']:.2f} bits/weight incl. scale+offset), other tensors "
          f"{_human(r['other_bytes'])}, file {_human(r['file_bytes'])}")
    errs = list(r["layer_errors"].values())
    print(f"relative output error per layer: mean {sum(errs) / len(errs):.4g}, max {max(errs):.4g}")
    return 0


def cmd_train(args) -> int:
    from qalora.config import LoraConfig, TrainConfig
    from qalora.training.distributed import from_env, leave
    from qalora.training.loop import train

    cfg = dataclass_from_args(TrainConfig, args)
    lora = dataclass_from_args(LoraConfig, args)
    ranks = from_env()  # torchrun --nproc-per-node N -m qalora train ...: one process per rank
    try:
        out = train(args.model, args.out, cfg, lora, resume=args.resume, progress=not args.quiet, ranks=ranks)
    finally:
        leave(ranks)
    if not ranks.main:
        return 0
    start = out["val_loss_start"]
    print(f"wrote {args.out}: {out['method']} adapter, {out['trainable_parameters']:,} trainable parameters; "
          f"validation loss {start:.4f} -> {out['val_loss_end']:.4f}; {out['seconds_per_step']:.2f} s/step; "
          f"peak RSS {out['peak_rss_mb'] / 1024:.2f} GB")
    return 0


def cmd_import(args) -> int:
    from qalora.formats.gguf_import import import_gguf
    from qalora.io import check_new_output

    src = Path(args.model).expanduser()
    if not src.is_file() or src.suffix.lower() != ".gguf":
        raise QaloraError(f"--model {args.model!r} is not a .gguf file; qalora import reads GGUF files "
                          "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K projections)")
    check_new_output(args.out)
    meta = import_gguf(src, args.out, progress=not args.quiet)
    types = ", ".join(f"{n} {t}" for t, n in sorted(meta["gguf_types"].items()))
    print(f"wrote {args.out}: {len(meta['layers'])} projections kept in their GGUF types ({types}), nothing "
          f"re-quantized; export it back with: qalora export --model {args.out} --like {args.model} --out FILE.gguf")
    return 0


def cmd_merge(args) -> int:
    if args.requantize:
        from qalora.config import QuantConfig
        from qalora.merging.requantize import requantize

        if args.tolerance is not None or args.no_noise_floor:
            raise QaloraError("--tolerance and --no-noise-floor gate the exact merge; the --requantize path is lossy "
                              "and reports its error instead")
        defaults = QuantConfig()
        config = QuantConfig(bits=args.bits if args.bits is not None else defaults.bits,
                             group_size=args.group_size if args.group_size is not None else defaults.group_size,
                             method=args.requantize)
        requantize(args.model, args.adapter, args.out, config, progress=not args.quiet)
        return 0
    from qalora.merging.command import merge

    if args.bits is not None or args.group_size is not None:
        raise QaloraError("--bits and --group-size apply with --requantize only: an exact merge keeps the grid of "
                          "the checkpoint the adapter was trained on")
    merge(args.model, args.adapter, args.out, tolerance=args.tolerance, noise_floor=not args.no_noise_floor,
          progress=not args.quiet)
    return 0


def cmd_eval(args) -> int:
    from qalora.api import evaluate
    from qalora.eval.options import EvalOptions
    from qalora.eval.report import format_table, write_json_new
    from qalora.io import check_new_output

    if args.out:
        check_new_output(args.out)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalOptions)}
    report = evaluate(args.model, args.tasks, adapter=args.adapter, kernel=args.kernel, progress=not args.quiet,
                      **options)
    print(format_table(report))
    if args.out:
        write_json_new(args.out, report)
        print(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from qalora.api import generate, load_model_and_tokenizer
    from qalora.config import DecodeConfig

    config = dataclass_from_args(DecodeConfig, args)  # validated before any weights load
    model, tok = load_model_and_tokenizer(args.model, kernel=args.kernel, adapter=args.adapter)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    generate(model, tok, args.prompt, chat=args.chat, streamer=streamer, **dataclasses.asdict(config))
    return 0


def cmd_pipeline(args) -> int:
    from qalora.config import PipelineConfig
    from qalora.stages.pipeline import format_table, pipeline

    c = dataclass_from_args(PipelineConfig, args)
    summary = pipeline(args.model, args.out, quant=c.quant_config(), lora=c.lora_config(), train_cfg=c.train_config(),
                       export=c.export, speed_tokens=c.speed_tokens, progress=not args.quiet)
    print(format_table(summary))
    exports = "".join(f" {Path(p).name}" + ("/" if Path(p).is_dir() else "") for p in summary["exports"].values())
    print(f"stages in {args.out}: quantized/ adapter/ merged/{exports} pipeline.json")
    return 0


def _earlier_report(args, report_file: str | None) -> dict | None:
    """The report already in ``--docs`` (``None`` if there is none), refused in one line when it
    is unreadable or of another suite or budget. Read before any work, and again under the lock
    just before this call's rows are merged into it (calls may run side by side)."""
    if not (args.docs and report_file and (Path(args.docs) / report_file).is_file()):
        return None
    from qalora.io import read_json

    previous = read_json(Path(args.docs) / report_file, f"{args.suite} report")
    if (previous.get("suite"), previous.get("budget")) != (args.suite, args.budget):
        raise QaloraError(f"{str(Path(args.docs) / report_file)!r} reports suite {previous.get('suite')!r} at "
                          f"budget {previous.get('budget')!r}; write this run's report into another --docs folder")
    return previous


def cmd_reproduce(args) -> int:
    import shlex

    from qalora.io import locked, write_json
    from qalora.reproduce import reproduce, write_docs

    grids = None
    if args.grids:
        if args.suite == "paper":
            raise QaloraError("--grids applies to --suite methods or tasks only")
        from qalora.reproduce.grids import parse_grid

        grids = [parse_grid(g) for g in args.grids]
    if args.cached_only and args.suite == "paper":
        raise QaloraError("--cached-only applies to --suite methods and tasks only")
    if args.method_rows and args.suite != "methods":
        raise QaloraError("--method-rows applies to --suite methods only")
    if (args.tasks or args.task_rows) and args.suite != "tasks":
        raise QaloraError("--tasks and --task-rows apply to --suite tasks only")
    if args.docs and not Path(args.docs).expanduser().resolve().parent.is_dir():
        raise QaloraError(f"--docs {args.docs!r}: its parent folder does not exist")
    report_file = {"methods": "methods.json", "tasks": "tasks.json"}.get(args.suite)
    _earlier_report(args, report_file)  # readable and of this suite before any work
    if args.paper_rows and args.notes:
        raise QaloraError("--notes applies to a whole paper report, not to --paper-rows")
    previous = None
    if args.paper_rows and args.docs:
        from qalora.reproduce.plan import check_paper_rows
        from qalora.reproduce.rerun import read_paper_report

        check_paper_rows(args.suite, args.paper_rows)
        previous = read_paper_report(args.docs, args.budget)  # readable, and of this budget, before any work
    if args.suite == "tasks" and args.docs and (earlier := _earlier_report(args, report_file)):
        from qalora.io import work_dir
        from qalora.reproduce.rates import seed_points

        seed_points(work_dir(args.out), earlier.get("selection", []))  # rates chosen by earlier calls
    summary = reproduce(args.out, args.budget, args.model, suite=args.suite, grids=grids, cached_only=args.cached_only,
                        tasks=args.tasks, task_rows=args.task_rows, method_rows=args.method_rows,
                        paper_rows=args.paper_rows, progress=not args.quiet)
    if args.paper_rows:
        from qalora.reproduce.rerun import rerun_file, rerun_markdown, rerun_report

        command = "qalora " + " ".join(shlex.quote(a) for a in args.argv)
        report = rerun_report(summary, previous, command, args.paper_rows)
        print(rerun_markdown(report))
        if args.docs:
            path = Path(args.docs) / rerun_file(args.paper_rows)
            write_json(path, report)
            print(f"wrote {path}")
        return 0
    if args.suite == "tasks":
        from qalora.reproduce.tasks_report import PLOT_FILE, merge_task_summaries, tasks_markdown, write_task_docs

        command = "qalora " + " ".join(shlex.quote(a) for a in args.argv)
        summary = {**summary, "command": command}  # kept per call under the report's `earlier`
        if not args.docs:
            print(tasks_markdown(summary, command))
            return 0
        Path(args.docs).mkdir(exist_ok=True)
        with locked(Path(args.docs) / report_file):  # another call may have added rows meanwhile
            summary = merge_task_summaries(_earlier_report(args, report_file), summary)
            print(tasks_markdown(summary, command, plot=PLOT_FILE))
            paths = write_task_docs(summary, args.docs, command)
        for path in paths:
            print(f"wrote {path}")
        return 0
    if args.suite == "methods":
        from qalora.reproduce.methods import merge_summaries, methods_table

        if not args.docs:
            print(methods_table(summary["rows"]))
            return 0
        summary = {**summary, "command": "qalora " + " ".join(shlex.quote(a) for a in args.argv)}
        Path(args.docs).mkdir(exist_ok=True)
        path = Path(args.docs) / report_file
        with locked(path):  # another call may have added rows meanwhile
            summary = merge_summaries(_earlier_report(args, report_file), summary)
            write_json(path, summary)
        print(methods_table(summary["rows"]))
        print(f"wrote {path}")
        return 0
    if args.docs:
        notes = Path(args.notes).read_text() if args.notes else ""
        command = "qalora " + " ".join(shlex.quote(a) for a in args.argv)
        for path in write_docs(summary, args.docs, command, notes):
            print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from qalora.config import DecodeConfig, LoraConfig, PipelineConfig, QuantConfig, TrainConfig
    from qalora.kernels.names import KERNEL_CHOICES

    p = argparse.ArgumentParser(prog="qalora", description="Quantization-aware LoRA for group-wise quantized LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's linear layers (RTN or GPTQ) into a qalora checkpoint")
    q.add_argument("--model", default="default", help="local Hugging Face folder, or 'default' (embedded SmolLM2-135M-Instruct)")
    q.add_argument("--out", required=True, help="new output folder")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    add_dataclass_args(q, QuantConfig)
    q.set_defaults(func=cmd_quantize)

    t = sub.add_parser("train", help="train adapters: QA-LoRA, PEQA scales, LoTA-QAF codes (exact merges), or the "
                                     "QLoRA / LoRA baselines")
    t.add_argument("--model", default="default",
                   help="qalora checkpoint for qalora/peqa/lota; HF folder or 'default' for qlora and lora")
    t.add_argument("--out", required=True, help="adapter folder (new, or an interrupted run with --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_args(t, TrainConfig)
    add_dataclass_args(t, LoraConfig)
    t.set_defaults(func=cmd_train)

    m = sub.add_parser("merge", help="fold an adapter (qalora, peqa, lota) into the quantized weights exactly, and verify")
    m.add_argument("--model", required=True, help="the qalora checkpoint the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter folder written by qalora train")
    m.add_argument("--out", required=True, help="new folder for the merged checkpoint (+ merge_report.json)")
    m.add_argument("--tolerance", type=float, default=None,
                   help="max |logit diff| of merged vs unmerged, both run in fp64 (default 1e-4); the fp32 "
                        "figure may reach max(tolerance, 4 x the unmerged model's fp32 noise floor)")
    m.add_argument("--no-noise-floor", action="store_true",
                   help="skip the fp64 runs (they need an fp64 copy of the weights); the fp32 figure is then "
                        "held to --tolerance")
    m.add_argument("--requantize", choices=["rtn", "gptq"],
                   help="LOSSY baseline path for lora/qlora adapters: merge in fp32, then quantize again")
    m.add_argument("--bits", type=int, default=None,
                   help=f"with --requantize: bits of the new codes (default {QuantConfig.bits})")
    m.add_argument("--group-size", type=int, default=None,
                   help=f"with --requantize: group size (default {QuantConfig.group_size})")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_merge)

    im = sub.add_parser("import", help="a quantized GGUF (llama.cpp) as a qalora checkpoint, its codes, scales and "
                                       "offsets kept as they are (no re-quantization), ready to train in place")
    im.add_argument("--model", required=True, help="a .gguf file of a llama, mistral, qwen2 or qwen3 model")
    im.add_argument("--out", required=True, help="new checkpoint folder")
    im.add_argument("--quiet", action="store_true")
    im.set_defaults(func=cmd_import)

    from qalora.export.command import add_export_parser

    add_export_parser(sub)  # gguf, torchao, mlx, peft, gguf-lora (options checked there)

    pl = sub.add_parser("pipeline", help="the whole path: quantize (GPTQ) -> train QA-LoRA -> exact merge -> verify "
                                         "-> GGUF export -> one table; rerun to resume")
    pl.add_argument("--model", default="default", help="local HF model folder, or 'default' (embedded SmolLM2-135M)")
    pl.add_argument("--out", default="qalora-pipeline", help="folder for every stage's output (reused if rerun)")
    add_dataclass_args(pl, PipelineConfig)
    pl.add_argument("--quiet", action="store_true")
    pl.set_defaults(func=cmd_pipeline)

    from qalora.eval.options import EvalOptions
    from qalora.eval.tasks import registry

    r = sub.add_parser("reproduce", help="the paper's Table 1 on a model: base, RTN/GPTQ, LoRA, QLoRA, QLoRA w/ "
                                         "RTN/GPTQ and QA-LoRA at INT4/3/2, evaluated; rerun to resume")
    r.add_argument("--model", default="default", help="local HF model folder, or 'default' (embedded SmolLM2-135M)")
    r.add_argument("--budget", choices=["small", "full", "smoke"], default="small",
                   help="small: subsets + 100 steps (3.2 h on 2 CPU cores, docs/RESULTS.md); full: everything (a GPU); smoke: minutes")
    r.add_argument("--suite", choices=["paper", "methods", "tasks"], default="paper",
                   help="paper: Table 1 rows at the original code's one rate, evaluated; methods: every exact method "
                        "vs QA-LoRA and QLoRA w/ GPTQ on the held-out instruction loss, each at its default rate; "
                        "tasks: task-specific tuning, each row at its own rate chosen on a validation part of the "
                        "training items, scored on held-out items, compared paired")
    r.add_argument("--grids", nargs="+", default=None,
                   help="--suite methods/tasks: only these grids (int4-g64 int3-g32 int2-g32; default all)")
    r.add_argument("--tasks", nargs="+", default=None,
                   help="--suite tasks: which tuning tasks (sst2 sciq csqa arithmetic boolq hellaswag piqa "
                        "winogrande siqa; default sst2 arithmetic)")
    r.add_argument("--task-rows", nargs="+", default=None,
                   help="--suite tasks: only these rows (base lora qlora qlora+rtn qlora+gptq qalora "
                        "qalora+scales peqa lota lota+qalora; default all)")
    r.add_argument("--method-rows", nargs="+", default=None,
                   help="--suite methods: only these rows (gptq qalora qalora+scales peqa lota lota+qalora qlora+gptq "
                        "lota-omega32 lota-r8; default all)")
    r.add_argument("--paper-rows", nargs="+", default=None,
                   help="--suite paper: rebuild only the rows of these methods (base lora qlora rtn gptq qlora+rtn "
                        "qlora+gptq qalora); with --docs they are set beside docs/results.json's rows in "
                        "results-rerun-<methods>.json, which stays as it is")
    r.add_argument("--cached-only", action="store_true",
                   help="--suite methods / tasks: report the rows (and rate-selection points) already computed in "
                        "--out, build nothing")
    r.add_argument("--out", default="qalora-reproduce", help="work folder (bases, adapters, models, row results)")
    r.add_argument("--docs", default=None, help="also write RESULTS.md, results.json, results.png into this folder")
    r.add_argument("--notes", default=None, help="a Markdown file appended to RESULTS.md as its discussion")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_reproduce)

    e = sub.add_parser("eval", help="evaluate a model: MMLU, commonsense multiple choice (lm-eval 0.4 prompts), "
                                    "perplexity on held-out LAMBADA passages")
    e.add_argument("--model", default="default", help="qalora checkpoint, HF folder or 'default'")
    e.add_argument("--adapter", help="adapter folder from qalora train, applied unmerged on --model")
    e.add_argument("--tasks", nargs="+", default=["perplexity"],
                   help=f"comma- or space-separated: {', '.join(registry())} (default: perplexity)")
    add_dataclass_args(e, EvalOptions)  # --shots --limit --seed --subset --batch-size ...
    e.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES)
    e.add_argument("--out", help="write results as JSON to this new file")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text, streamed (greedy by default)")
    g.add_argument("--model", default="default", help="qalora checkpoint, HF folder or 'default'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    g.add_argument("--adapter", help="adapter folder from qalora train, applied unmerged on --model")
    add_dataclass_args(g, DecodeConfig)  # --max-new-tokens --temperature ... --compile --head-bits
    g.add_argument("--kernel", default="auto", choices=KERNEL_CHOICES)
    g.set_defaults(func=cmd_generate)
    return p


def _own_output() -> None:
    """A command prints its own lines and bars only: transformers' per-load "Loading weights" bars
    are turned off for this process (the CLI owns it; the library leaves them alone)."""
    from qalora.quiet import import_transformers

    import_transformers()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        _own_output()
        return args.func(args)
    except QaloraError as e:
        print(f"qalora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qalora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
