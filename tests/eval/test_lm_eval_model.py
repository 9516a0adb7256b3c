"""The lm-evaluation-harness model ``qalora`` on a tiny quantized checkpoint: each request type
against a naive one-request-at-a-time reference, and whole runs through ``simple_evaluate`` and
the ``qalora-lm-eval`` command line on a local multiple-choice task."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from qalora.checkpoint import save_checkpoint  # noqa: E402
from qalora.config import QuantConfig  # noqa: E402
from qalora.errors import QaloraError  # noqa: E402
from qalora.eval.lm_eval_model import (QaloraLM, parse_batch_size, resolve_device, rolling_windows,  # noqa: E402
                                        split_like_lm_eval)
from qalora.quant.model import quantize_model  # noqa: E402

# Batched fp32 log-softmax vs one request at a time in fp64: sums of up to ~40 log-probs of
# magnitude ~6 agree to ~1e-5 here; 1e-4 absolute + relative leaves room for BLAS order.
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny INT4 g32 RTN qalora checkpoint folder."""
    path = tmp_path_factory.mktemp("lm_eval") / "q4"
    model = tiny_llama()
    quantize_model(model, QuantConfig(bits=4, group_size=32, method="rtn"), progress=False)
    save_checkpoint(model, tiny_tokenizer(), path, {"bits": 4, "group_size": 32, "method": "rtn"})
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return QaloraLM(path=str(ckpt), kernel="reference", batch_size=3, device="cpu")


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def naive_logprobs(model, ids):
    """``log p(ids[t] | ids[<t])`` for t >= 1, one unpadded fp64 forward pass."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits.double(), -1)[0]   # [T, V]
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logp[:-1].argmax(-1)


def naive_pair(model, tok, context, continuation):
    """lm-eval's definition written out: whitespace moves right, the pair is encoded whole."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    if context:
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    else:
        assert tok.bos_token_id is None  # the tiny tokenizer: the prefix token is eos
        ctx, cont = [tok.eos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
    lp, argmax = naive_logprobs(model, ctx + cont)
    n = len(cont)
    return lp[-n:].sum().item(), bool((argmax[-n:] == torch.tensor(cont)).all())


def test_split_moves_all_trailing_whitespace():
    assert split_like_lm_eval("Answer:\n", "B") == ("Answer:", "\nB")
    assert split_like_lm_eval("the cat ", "sat") == ("the cat", " sat")
    assert split_like_lm_eval("", " x") == ("", " x")


def test_loglikelihood_equals_naive(lm):
    pairs = [("the quick brown", " fox"), ("a quantized model keeps ", "its weights in few bits"),
             ("low rank adapters\n", "learn"), ("", "group wise scales"), ("the", " lazy dog jumps over")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    ref = [naive_pair(lm.model, lm.tokenizer, c, y) for c, y in pairs]
    torch.testing.assert_close(torch.tensor([g[0] for g in got], dtype=torch.float64),
                               torch.tensor([r[0] for r in ref], dtype=torch.float64), **TOL)
    assert [g[1] for g in got] == [r[1] for r in ref]


def test_rolling_windows_follow_lm_eval_docstring_example():
    # lm-eval's LM.loglikelihood_rolling docstring: tokens 0..9, prefix P, max length 4
    P = 99
    assert rolling_windows(list(range(10)), P, 4) == [([P], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                      ([5, 6, 7], [8, 9])]
    assert rolling_windows([], P, 4) == []


def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(lm):
    texts = ["the quick brown fox jumps over the lazy dog", "low rank adapters learn a small update"]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    ref = []
    for t in texts:  # shorter than max_length: one window, conditioned on the prefix (eos) token
        ids = lm.tokenizer(t, add_special_tokens=False)["input_ids"]
        assert len(ids) < lm.max_length
        ref.append(naive_logprobs(lm.model, [lm.tokenizer.eos_token_id] + ids)[0].sum().item())
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64), **TOL)


def test_loglikelihood_rolling_over_several_windows(ckpt):
    short = QaloraLM(path=str(ckpt), kernel="reference", batch_size=2, max_length=8, device="cpu")
    text = " ".join(["group wise scales and offsets describe every block of weights"] * 2)
    ids = short.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = rolling_windows(ids, short.prefix_token_id, 8)
    assert len(windows) >= 3 and sum(len(w[1]) for w in windows) == len(ids)  # every token scored once
    ref = sum(naive_logprobs(short.model, ctx + tgt)[0][-len(tgt):].sum().item() for ctx, tgt in windows)
    got = short.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)[0]
    torch.testing.assert_close(got, ref, **TOL)


def greedy_text(lm, context, n):
    ids = torch.tensor([lm.tokenizer(context, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_until_equals_greedy_generate_cut_at_stop_strings(lm):
    contexts = ["the quick brown fox", "a quantized model keeps"]
    full = [greedy_text(lm, c, 24) for c in contexts]
    stops = [f[len(f) // 2:len(f) // 2 + 2] for f in full]  # strings the greedy text does contain
    assert all(len(s) == 2 for s in stops)
    args = [(c, {"until": [s], "max_gen_toks": 24}) for c, s in zip(contexts, stops)]
    args.append((contexts[0], {"until": ["\n\n"], "max_gen_toks": 5, "do_sample": False}))
    got = lm.generate_until(requests("generate_until", args), disable_tqdm=True)
    assert got[:2] == [f.split(s)[0] for f, s in zip(full, stops)]
    assert all(len(g) < len(f) for g, f in zip(got, full))  # the stop string cut them short
    assert got[2] == greedy_text(lm, contexts[0], 5).split("\n\n")[0]  # max_gen_toks honoured


def test_refusals(lm):
    with pytest.raises(QaloraError, match="greedily"):
        lm.generate_until(requests("generate_until", [("x", {"do_sample": True, "temperature": 0.7})]))
    with pytest.raises(QaloraError, match="batch_size 'auto'"):
        parse_batch_size("auto")
    assert parse_batch_size("16") == 16 and parse_batch_size(None) >= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_request_falls_back_to_cpu_without_cuda():
    assert resolve_device("cuda:0") == "cpu"  # lm-eval's command line asks for cuda:0 by default
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"


def test_chat_template(ckpt):
    lm = QaloraLM(path=str(ckpt), device="cpu")
    assert lm.chat_template(False) is None
    with pytest.raises(QaloraError, match="no chat template"):
        lm.chat_template(True)
    lm.tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                  "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"


def test_adapter_is_attached(ckpt, tmp_path):
    from qalora.api import load_model_and_tokenizer
    from qalora.config import LoraConfig, TrainConfig
    from qalora.training.loop import train

    rows = [{"instruction": f"what is {i} plus {i}?", "output": f"{2 * i}."} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(data=str(tmp_path / "d.jsonl"), steps=1, batch_size=4, lr=1e-2, max_seq_len=64,
                      eval_every=1, save_every=1, eval_batches=1)
    train(ckpt, tmp_path / "a", cfg, LoraConfig(rank=4, alpha=8), progress=False)
    pair = [("what is 3 plus 3?", " 6.")]
    with_adapter = QaloraLM(path=str(ckpt), adapter=str(tmp_path / "a"), kernel="reference", device="cpu")
    got = with_adapter.loglikelihood(requests("loglikelihood", pair), disable_tqdm=True)[0][0]
    model, tok = load_model_and_tokenizer(ckpt, kernel="reference", adapter=tmp_path / "a")
    torch.testing.assert_close(got, naive_pair(model, tok, *pair[0])[0], **TOL)
    plain = QaloraLM(path=str(ckpt), kernel="reference", device="cpu")
    assert abs(got - plain.loglikelihood(requests("loglikelihood", pair), disable_tqdm=True)[0][0]) > 1e-3


def test_registered_without_hiding_stock_models():
    from lm_eval.api.registry import get_model

    assert get_model("qalora") is QaloraLM
    assert get_model("hf").__name__ == "HFLM"


# ------------------------------------------------------------------ end to end

DOCS = [{"goal": "the quick brown fox", "sol1": "jumps over the lazy dog", "sol2": "keeps its weights", "label": 0},
        {"goal": "a quantized model", "sol1": "keeps its weights in few bits", "sol2": "the lazy dog", "label": 0},
        {"goal": "low rank adapters", "sol1": "group wise scales", "sol2": "learn a small update", "label": 1},
        {"goal": "group wise scales", "sol1": "describe every block", "sol2": "of weights", "label": 1},
        {"goal": "the lazy dog", "sol1": "brown fox", "sol2": "jumps over", "label": 0},
        {"goal": "few bits", "sol1": "low rank", "sol2": "a small update to each layer", "label": 1}]


def write_task(folder):
    """A PIQA-shaped local task (lm-eval's PIQA prompt) reading ``data.jsonl`` in ``folder``."""
    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder / 'data.jsonl'}
  cache_dir: {folder / 'hf_cache'}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def expected_metrics(model, tok):
    """acc and acc_norm from :func:`naive_pair` (one unbatched fp64 forward per request, not
    qalora's scoring path) and lm-eval's definitions: continuation ``" " + choice``; acc_norm
    divides by the choice's character length. The two choices of every item must be at least
    0.01 nats apart (raw and normalised), so that the 1e-4 agreement of TOL cannot flip a pick."""
    acc = acc_norm = 0
    for d in DOCS:
        choices = [d["sol1"], d["sol2"]]
        lls = [naive_pair(model, tok, f"Question: {d['goal']}\nAnswer:", " " + c)[0] for c in choices]
        norm = [ll / len(c) for ll, c in zip(lls, choices)]
        assert abs(lls[0] - lls[1]) > 1e-2 and abs(norm[0] - norm[1]) > 1e-2, d
        acc += max(range(2), key=lambda i: lls[i]) == d["label"]
        acc_norm += max(range(2), key=lambda i: norm[i]) == d["label"]
    return acc / len(DOCS), acc_norm / len(DOCS)


def test_simple_evaluate_reports_the_directly_computed_accuracy(lm, ckpt, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_task(tmp_path)
    # by registered name, as the command line does (the `lm` fixture is the same model)
    out = lm_eval.simple_evaluate(model="qalora", model_args=f"path={ckpt},kernel=reference", batch_size=4,
                                  device="cpu", tasks=["tiny_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    res = out["results"]["tiny_mc"]
    acc, acc_norm = expected_metrics(lm.model, lm.tokenizer)
    assert res["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert res["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    # and every request lm-eval sent, as logged: its log-likelihood is the naive one
    samples = sorted(out["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == DOCS
    got = [ll for s in samples for ((ll, _greedy),) in s["resps"]]
    want = [naive_pair(lm.model, lm.tokenizer, *args)[0] for s in samples for args in s["arguments"]]
    assert [args for s in samples for args in s["arguments"]] == [
        (f"Question: {d['goal']}\nAnswer:", " " + d[c]) for d in DOCS for c in ("sol1", "sol2")]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), **TOL)


@pytest.mark.slow  # ~15 s: lm-eval's command line always indexes its ~15,000 built-in task files
def test_console_script_runs_lm_eval_cli_with_the_qalora_model(lm, ckpt, tmp_path):
    write_task(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qalora.eval.lm_eval_cli", "--model", "qalora",
           "--model_args", f"path={ckpt},kernel=reference", "--tasks", "tiny_mc", "--include_path", str(tmp_path),
           "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result_files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(result_files) == 1
    res = json.loads(result_files[0].read_text())["results"]["tiny_mc"]
    acc, acc_norm = expected_metrics(lm.model, lm.tokenizer)
    assert res["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert res["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)


def test_console_script_error_is_one_line(monkeypatch, capsys):
    import lm_eval.__main__

    from qalora.eval import lm_eval_cli

    def fail():
        parse_batch_size("auto")  # what QaloraLM does with `--batch_size auto`

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fail)
    with pytest.raises(SystemExit) as exit_:
        lm_eval_cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("qalora-lm-eval: error: batch_size 'auto'") and err.count("\n") == 1


def test_import_qalora_does_not_need_lm_eval():
    code = "import sys, qalora, qalora.eval.scoring; assert 'lm_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.embedded
def test_embedded_model_scores_like_stock_hflm(embedded_dir):
    """Five PIQA-style items on the embedded SmolLM2: qalora's requests vs lm-eval's own ``hf`` model."""
    from lm_eval.models.huggingface import HFLM

    items = [("Question: How do I keep bread fresh?\nAnswer:", " Store it in a sealed bag."),
             ("Question: How do I keep bread fresh?\nAnswer:", " Leave it on the stove."),
             ("Question: How can I open a jar with a tight lid?\nAnswer:", " Run the lid under hot water."),
             ("Question: How can I open a jar with a tight lid?\nAnswer:", " Put the jar in the freezer overnight."),
             ("", "To dry wet shoes, stuff them with newspaper.")]
    ours = QaloraLM(path="default", batch_size=4, device="cpu")
    stock = HFLM(pretrained=str(embedded_dir), device="cpu", dtype="float32", batch_size=4)
    got = ours.loglikelihood(requests("loglikelihood", items), disable_tqdm=True)
    ref = stock.loglikelihood(requests("loglikelihood", items), disable_tqdm=True)
    # both fp32; only padding and batch composition differ: 1e-3 nats on sums of ~10-40 log-probs
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([r[0] for r in ref]),
                               atol=1e-3, rtol=1e-4)
    assert [g[1] for g in got] == [r[1] for r in ref]
    texts = [("Bread keeps longer in a sealed bag than on the counter.",)]
    torch.testing.assert_close(ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts), True),
                               stock.loglikelihood_rolling(requests("loglikelihood_rolling", texts), True),
                               atol=1e-3, rtol=1e-4)
    gen = [("Question: What color is the sky on a clear day?\nAnswer:", {"until": ["\n"], "max_gen_toks": 16})]
    assert ours.generate_until(requests("generate_until", gen), True) == \
        stock.generate_until(requests("generate_until", gen), True)
