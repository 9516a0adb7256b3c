"""``qalora export``: its options and their checks (``cli.py`` adds this subcommand from here).

    qalora export --model CKPT --out model.gguf                       # llama.cpp (Q4_1)
    qalora export --model CKPT --format torchao --out DIR             # transformers + torchao
    qalora export --model CKPT --format mlx --out DIR                 # mlx-lm
    qalora export --adapter ADIR --format peft --out DIR --base-out BASE   # PEFT LoRA + its dense base
    qalora export --adapter ADIR --format gguf-lora --out adapter.gguf     # llama.cpp --lora
    qalora export --model CKPT --like SOURCE.gguf --out model.gguf    # a `qalora import`ed GGUF, in its own types

The checkpoint formats export ``--model``; the adapter formats export ``--adapter`` on its own
(unmerged serving), ``--model`` then naming the base it was trained on (default: the one its
config records; checked by fingerprint either way).
"""

from __future__ import annotations

import argparse

from qalora.errors import QaloraError

CHECKPOINT_FORMATS = ("gguf", "torchao", "mlx")
ADAPTER_FORMATS = ("peft", "gguf-lora")
FORMATS = CHECKPOINT_FORMATS + ADAPTER_FORMATS


def add_export_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="write a qalora checkpoint in a runtime's format (gguf for llama.cpp, torchao "
                                      "for transformers, mlx), or an adapter on its own (peft, gguf-lora)")
    x.add_argument("--model", default=None,
                   help="qalora checkpoint (quantized or merged) for gguf, torchao, mlx; with peft / gguf-lora: the "
                        "base the adapter was trained on (default: the one its config records)")
    x.add_argument("--adapter", default=None, help="--format peft / gguf-lora: adapter folder written by qalora train")
    x.add_argument("--format", choices=FORMATS, default="gguf",
                   help="gguf: one llama.cpp file; torchao: a folder AutoModelForCausalLM.from_pretrained loads "
                        "(needs torchao, not qalora); mlx: a folder mlx_lm.load loads (MLX affine layers); peft: a PEFT "
                        "LoRA folder of --adapter; gguf-lora: a llama.cpp LoRA adapter file of --adapter")
    x.add_argument("--out", required=True, help="new output file (gguf, gguf-lora) or folder (torchao, mlx, peft)")
    x.add_argument("--base-out", default=None,
                   help="--format peft: also write the base checkpoint dequantized (fp32 scale * q + offset) as a plain "
                        "transformers folder here, recorded as the adapter's base")
    x.add_argument("--base-name", default=None,
                   help="--format peft: a base folder written before (--base-out, or a --format torchao export of the "
                        "same checkpoint) to record as the adapter's base; checked against the adapter")
    x.add_argument("--dtype", default=None, help="--format mlx: float16 (default), bfloat16 or float32 for scales, "
                                                 "biases, embeddings and norms")
    x.add_argument("--layout", choices=["unpacked", "packed"], default=None,
                   help="--format torchao: unpacked (default; safetensors, one code per byte, any CPU) or packed "
                        "(two codes per byte, torchao's prototype CPU int4 kernel, this CPU kind only; bits <= 4)")
    x.add_argument("--fallback", choices=["f16"], default=None,
                   help="write layers Q4_1 cannot hold exactly (8-bit, groups not a multiple of 32) as F16, "
                        "reporting their error; default: refuse")
    x.add_argument("--like", default=None,
                   help="--format gguf, a checkpoint from qalora import: write the source GGUF back with each "
                        "projection in its own type and every other byte as it was")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=cmd_export)
    return x


def check_options(args) -> None:
    """Refuse an option the chosen format does not take, or a missing input, in one line."""
    fmt = args.format
    if args.dtype is not None and fmt != "mlx":
        raise QaloraError("--dtype applies to --format mlx only")
    if getattr(args, "layout", None) is not None and fmt != "torchao":
        raise QaloraError("--layout applies to --format torchao only")
    if args.fallback is not None and fmt != "gguf":
        held = {"mlx": "the mlx format holds every layer it accepts", "torchao": "the torchao format holds every layer"}
        raise QaloraError(f"--fallback applies to --format gguf only; "
                          f"{held.get(fmt, 'an adapter export writes fp32 LoRA tensors')}")
    if getattr(args, "like", None) is not None and (fmt != "gguf" or args.fallback is not None):
        raise QaloraError("--like applies to --format gguf without --fallback: the source's own types are written")
    if (args.base_out is not None or args.base_name is not None) and fmt != "peft":
        raise QaloraError("--base-out and --base-name apply to --format peft only")
    if fmt in ADAPTER_FORMATS and args.adapter is None:
        raise QaloraError(f"--format {fmt} exports an adapter on its own: pass --adapter ADAPTER_DIR "
                          "(the --out folder of qalora train)")
    if fmt in CHECKPOINT_FORMATS:
        if args.adapter is not None:
            raise QaloraError(f"--adapter applies to --format peft and gguf-lora; for --format {fmt}, merge first "
                              "(qalora merge) and pass the merged checkpoint as --model")
        if args.model is None:
            raise QaloraError(f"--format {fmt} exports a qalora checkpoint: pass --model CKPT")


def cmd_export(args) -> int:
    check_options(args)
    progress = not args.quiet
    if args.format == "mlx":
        from qalora.export.mlx import export_mlx

        export_mlx(args.model, args.out, **({"dtype": args.dtype} if args.dtype else {}), progress=progress)
    elif args.format == "torchao":
        from qalora.export.torchao import export_torchao

        export_torchao(args.model, args.out, **({"layout": args.layout} if args.layout else {}), progress=progress)
    elif args.format == "gguf" and args.like is not None:
        from qalora.formats.gguf_import import export_like
        from qalora.io import check_new_output

        check_new_output(args.out)
        r = export_like(args.model, args.like, args.out)
        print(f"wrote {args.out}: {len(r['rewritten'])} tensors re-encoded in their own types, {r['kept']} kept "
              f"byte for byte ({r['size']:,} bytes, sha256 {r['sha256'][:12]}…)")
    elif args.format == "gguf":
        from qalora.export.gguf import export_gguf

        export_gguf(args.model, args.out, fallback=args.fallback, progress=progress)
    elif args.format == "peft":
        from qalora.export.peft import export_peft

        export_peft(args.adapter, args.out, model=args.model, base_out=args.base_out, base_name=args.base_name,
                    progress=progress)
    else:
        from qalora.export.gguf_lora import export_gguf_lora

        export_gguf_lora(args.adapter, args.out, model=args.model, progress=progress)
    return 0
