"""Small validated configuration records, one per concern. Defaults live here only: the CLI
reads them from the dataclass fields (see ``cli.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qalora.adapters.methods import METHODS
from qalora.errors import QaloraError
from qalora.quant.bits import SUPPORTED_BITS

QUANT_METHODS = ("rtn", "gptq")


@dataclass
class QuantConfig:
    """How a model's linear layers are quantized.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        group_size: L, contiguous input columns sharing one (scale, offset); must divide the
            ``in_features`` of every quantized layer. 32 as in the paper.
        method: ``rtn`` (min-max round to nearest) or ``gptq`` (needs calibration data).
        skip: module-name suffixes left in full precision (``lm_head`` by default; embeddings
            are never nn.Linear and are never quantized).
        calib_samples: GPTQ calibration sequences.
        calib_seq_len: tokens per calibration sequence.
        calib_batch_size: sequences per forward during calibration.
        damp: GPTQ damping, as a fraction of the mean Hessian diagonal.
        block_size: GPTQ lazy-update block (rounded to a multiple of ``group_size``).
        true_sequential: GPTQ quantizes a decoder layer's linears in execution order
            (q/k/v, o, gate/up, down), each seeing the already quantized ones' outputs.
        seed: calibration sampling seed.
    """

    bits: int = field(default=4, metadata={"help": "bits per weight code: 2, 3, 4 or 8"})
    group_size: int = field(default=32, metadata={"help": "input columns per quantization group"})
    method: str = field(default="gptq", metadata={"help": "rtn or gptq"})
    skip: tuple[str, ...] = field(default=("lm_head",), metadata={"help": "module-name suffixes kept in full precision"})
    calib_samples: int = field(default=128, metadata={"help": "GPTQ calibration sequences"})
    calib_seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    calib_batch_size: int = field(default=8, metadata={"help": "calibration sequences per forward"})
    damp: float = field(default=0.01, metadata={"help": "GPTQ damping (fraction of mean Hessian diagonal)"})
    block_size: int = field(default=128, metadata={"help": "GPTQ lazy-update block size"})
    true_sequential: bool = field(default=True, metadata={"help": "GPTQ: quantize a layer's linears in execution order"})
    seed: int = field(default=0, metadata={"help": "calibration sampling seed"})

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QaloraError(f"bits {self.bits!r} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise QaloraError(f"group_size {self.group_size!r} is not supported; use a positive size that divides "
                              "every layer's in_features, e.g. 32, 64 or 128")
        if self.method not in QUANT_METHODS:
            raise QaloraError(f"method {self.method!r} is unknown; use one of {', '.join(QUANT_METHODS)}")
        for name in ("calib_samples", "calib_seq_len", "calib_batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise QaloraError(f"{name} {getattr(self, name)!r} must be at least 1")
        if not 0 <= self.damp < 1:
            raise QaloraError(f"damp {self.damp!r} must be in [0, 1)")
        self.skip = tuple(self.skip)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d


TRAIN_METHODS = tuple(METHODS)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """The adapters. Defaults as in the original QA-LoRA code: rank 64, alpha 16, dropout 0,
    every attention and MLP projection. QA-LoRA's group size is read from the quantized base,
    never set here.

    Attributes:
        rank: r, the inner dimension of ``B A``.
        alpha: scaling numerator, ``s = alpha / r``.
        dropout: dropout on the adapter input (after pooling for QA-LoRA).
        targets: module-name suffixes that get an adapter.
        train_scales: also train the scales (``qalora``, ``lota``): PEQA / E2E-QP style.
        with_qalora: ``lota`` only: add QA-LoRA offsets beside the ternary code updates.
        lota_omega: LoTA's threshold ω on ``B_T A_T`` (default ``0.75 * rank``, the paper's 48 at r = 64).
        lota_codes_only: LoTA moves the codes only (``mu = 0``: offsets untouched), so it fits a storage
            form that cannot hold a float offset (GGUF's tied-zero and K-quant types).
    """

    rank: int = field(default=64, metadata={"help": "adapter rank r"})
    alpha: float = field(default=16.0, metadata={"help": "adapter scaling numerator (s = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "adapter dropout (after pooling for QA-LoRA)"})
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS, metadata={"help": "module-name suffixes that get adapters"})
    train_scales: bool = field(default=False, metadata={"help": "also train the per-group scales (qalora, lota)"})
    with_qalora: bool = field(default=False, metadata={"help": "lota: add QA-LoRA offsets"})
    lota_omega: float | None = field(default=None, metadata={"help": "lota threshold on B_T A_T (default 0.75 x rank)"})
    lota_codes_only: bool = field(default=False, metadata={"help": "lota: move codes only, no float remainder on the "
                                                                   "offsets (for files whose offsets are tied to the "
                                                                   "scale, e.g. an imported GGUF)"})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise QaloraError(f"rank {self.rank!r} must be a positive integer, e.g. 8, 16 or 64")
        if not 0 <= self.dropout < 1:
            raise QaloraError(f"dropout {self.dropout!r} must be in [0, 1)")
        self.targets = tuple(self.targets)
        if self.lota_omega is not None and not self.lota_omega > 0:
            raise QaloraError(f"lota_omega {self.lota_omega!r} must be positive, e.g. {0.75 * self.rank:g} (0.75 x rank)")
        if not self.targets:
            raise QaloraError("targets is empty; name at least one projection, e.g. q_proj v_proj")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass
class TrainConfig:
    """One training run. Defaults follow the original QA-LoRA code where it has one (constant
    schedule, grad-norm clip 0.3), except the learning rate: each method has its own
    (``qalora.adapters.methods.METHODS[m].lr``; QA-LoRA's group-mean input needs a higher one).

    Attributes:
        method: ``qalora`` (QA-LoRA), ``peqa`` (trained scales) or ``lota`` (LoTA-QAF) on an INTn
            qalora checkpoint; ``qlora`` (NF4 base + LoRA) or ``lora`` (unquantized model):
            see ``qalora.adapters.methods``.
        data: ``default`` (embedded instruction mixture), a JSON/JSONL file or a datasets folder.
        steps: optimizer steps.
        batch_size: sequences per micro-batch; ``grad_accum`` micro-batches per step.
        lr, warmup_steps, weight_decay, max_grad_norm: AdamW, constant LR after linear warmup;
            ``lr=None`` takes the method's own default, so a record always holds the rate used.
        max_seq_len: tokens per sequence (responses are truncated, prompts never).
        compute_dtype: ``fp32`` or ``bf16`` (autocast; adapters and optimizer stay fp32).
        eval_every, eval_batches: validation loss every N steps on a fixed set of batches.
        save_every: checkpoint every N steps (atomic; the last two are kept).
        grad_checkpointing: recompute decoder layers in backward to save activation memory.
        parallel: under torchrun, ``ddp`` (adapters replicated, gradients all-reduced) or ``fsdp2``
            (``fully_shard`` per decoder layer); one process ignores it.
        seed: model init, dropout and data order.
        tsign_start, tsign_mid, tsign_end, tsign_ramp: t-SignSGD's quantile σ of |grad| (ternary
            parameters of ``lota``): linear from ``start`` to ``mid`` over the first ``ramp`` of
            the steps, then to ``end`` at the last step (LoTA-QAF: 0.95, 0.999, 0.9999, 0.8).
    """

    method: str = field(default="qalora", metadata={"help": "qalora, peqa, lota, qlora or lora"})
    data: str = field(default="default", metadata={"help": "'default', a JSON/JSONL file or a datasets folder"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(default=None, metadata={"help": "learning rate, constant after warmup (default: the "
                                                            "method's own: " + ", ".join(
                                                                f"{m.name} {m.lr:g}" for m in METHODS.values()) + ")"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=0.3, metadata={"help": "gradient-norm clip (0 disables)"})
    max_seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    compute_dtype: str = field(default="fp32", metadata={"help": "fp32 or bf16"})
    eval_every: int = field(default=50, metadata={"help": "validation loss every N steps"})
    eval_batches: int = field(default=8, metadata={"help": "validation batches"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute layers in backward"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp or fsdp2 (fully_shard per decoder layer)"})
    seed: int = field(default=0, metadata={"help": "seed for init, dropout and data order"})
    tsign_start: float = field(default=0.95, metadata={"help": "t-SignSGD: quantile of |grad| at step 1"})
    tsign_mid: float = field(default=0.999, metadata={"help": "t-SignSGD: quantile at the end of the ramp"})
    tsign_end: float = field(default=0.9999, metadata={"help": "t-SignSGD: quantile at the last step"})
    tsign_ramp: float = field(default=0.8, metadata={"help": "t-SignSGD: fraction of the steps of the first ramp"})

    def __post_init__(self) -> None:
        if self.method not in TRAIN_METHODS:
            raise QaloraError(f"method {self.method!r} is unknown; use one of {', '.join(TRAIN_METHODS)}")
        if self.parallel not in ("ddp", "fsdp2"):
            raise QaloraError(f"parallel {self.parallel!r} is unknown; use ddp or fsdp2")
        if self.compute_dtype not in ("fp32", "bf16"):
            raise QaloraError(f"compute_dtype {self.compute_dtype!r} is unknown; use fp32 or bf16")
        for name in ("steps", "batch_size", "grad_accum", "max_seq_len", "eval_every", "eval_batches", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise QaloraError(f"{name} {getattr(self, name)!r} must be a positive integer")
        if self.max_seq_len < 8:
            raise QaloraError(f"max_seq_len {self.max_seq_len} is too short; use at least 8 (e.g. 256)")
        if self.lr is None:
            self.lr = METHODS[self.method].lr
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise QaloraError(f"lr {self.lr!r} must be positive, e.g. 2e-4")
        if self.warmup_steps < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise QaloraError("warmup_steps, max_grad_norm and weight_decay must not be negative")
        if not 0 <= self.tsign_start <= self.tsign_mid <= self.tsign_end < 1:
            raise QaloraError(f"t-SignSGD quantiles {self.tsign_start}, {self.tsign_mid}, {self.tsign_end} must rise "
                              "within [0, 1), e.g. 0.95, 0.999, 0.9999")
        if not 0 < self.tsign_ramp <= 1:
            raise QaloraError(f"tsign_ramp {self.tsign_ramp!r} must be in (0, 1], e.g. 0.8")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PipelineConfig:
    """The main job (``qalora pipeline``): quantize with GPTQ, train QA-LoRA, merge exactly, export.
    Its own defaults (INT3 g32, 100 steps) live here; everything else is read from the configs above.

    Attributes:
        bits, group_size, quant_method, calib_samples: the quantized base (``QuantConfig``).
        steps, lr, rank, batch_size, max_seq_len, data, seed: the QA-LoRA run (``TrainConfig``,
            ``LoraConfig``); validation and checkpoints at half and at the end.
        speed_tokens: tokens decoded to time the merged model against the unmerged one.
        export: runtimes to write the merged model for, comma-separated: ``gguf`` (llama.cpp,
            ``model.gguf``), ``mlx`` (mlx-lm, ``model-mlx/``), or ``none``.
    """

    bits: int = field(default=3, metadata={"help": "bits per weight code: 2, 3, 4 or 8"})
    group_size: int = field(default=QuantConfig.group_size, metadata={"help": "input columns per quantization group"})
    quant_method: str = field(default=QuantConfig.method, metadata={"help": "rtn or gptq"})
    calib_samples: int = field(default=QuantConfig.calib_samples, metadata={"help": "GPTQ calibration sequences"})
    steps: int = field(default=100, metadata={"help": "QA-LoRA optimizer steps"})
    lr: float | None = field(default=None, metadata={"help": f"learning rate (default: QA-LoRA's own, "
                                                                     f"{METHODS['qalora'].lr:g})"})
    rank: int = field(default=LoraConfig.rank, metadata={"help": "adapter rank r"})
    batch_size: int = field(default=TrainConfig.batch_size, metadata={"help": "sequences per micro-batch"})
    max_seq_len: int = field(default=TrainConfig.max_seq_len, metadata={"help": "tokens per training sequence"})
    data: str = field(default=TrainConfig.data, metadata={"help": "'default' (packaged mixture) or a JSON/JSONL file"})
    seed: int = field(default=TrainConfig.seed, metadata={"help": "seed for init, dropout and data order"})
    speed_tokens: int = field(default=64, metadata={"help": "tokens decoded to time merged vs unmerged"})
    export: str = field(default="gguf", metadata={"help": "comma-separated exports of the merged model: gguf "
                                                          "(llama.cpp), mlx (mlx-lm), or none"})

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, method=self.quant_method,
                           calib_samples=self.calib_samples)

    def train_config(self) -> TrainConfig:
        half = max(1, self.steps // 2)
        return TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, max_seq_len=self.max_seq_len,
                           data=self.data, eval_every=half, save_every=half, seed=self.seed)

    def lora_config(self) -> LoraConfig:
        return LoraConfig(rank=self.rank)


HEAD_BITS = (0, 2, 3, 4, 8)


@dataclass
class DecodeConfig:
    """How ``qalora generate`` / ``qalora.generate`` decode (``qalora.decode``).

    Attributes:
        max_new_tokens: tokens generated per sequence (fewer when every sequence ends with eos).
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        top_k: sample among the k most likely tokens (0 = all).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``.
        seed: sampling seed (a generator of the call's own; ``None``: one drawn from torch's).
        compile: compile the one-token decode step with ``torch.compile`` (static shapes: the KV
            cache is preallocated); pays after its one-time compilation (minutes on 2 cores).
        head_bits: quantize the output head in memory before decoding, RTN per (row, group) of
            ``head_group_size`` input columns (0 keeps it as loaded; 2/3/4 run on the int4 kernel,
            8 on the reference kernel). The head then computes exactly ``scale·q + offset``.
        head_group_size: the head's quantization group.
    """

    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (with --temperature > 0)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = all)"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (one-time compile, minutes)"})
    head_bits: int = field(default=0, metadata={"help": "quantize the output head to 2, 3, 4 or 8 bits (0 = keep)"})
    head_group_size: int = field(default=32, metadata={"help": "input columns per group of the quantized head"})

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise QaloraError(f"max_new_tokens {self.max_new_tokens!r} must be a positive integer")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise QaloraError(f"sampling needs temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                              f"got {self.temperature}, {self.top_p}, {self.top_k}")
        if self.head_bits not in HEAD_BITS:
            raise QaloraError(f"head_bits {self.head_bits!r} is not supported; use one of {', '.join(map(str, HEAD_BITS))}")
        if not isinstance(self.head_group_size, int) or self.head_group_size < 2:
            raise QaloraError(f"head_group_size {self.head_group_size!r} must be an integer >= 2 that divides the "
                              "hidden size, e.g. 32 or 64")
