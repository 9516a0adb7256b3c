"""``qalora-lm-eval``: lm-evaluation-harness's own command line with the ``qalora`` model
registered, e.g. ``qalora-lm-eval --model qalora --model_args path=q3 --tasks piqa --device cpu``.

lm-eval 0.4.13 discovers no models from other packages, so ``lm_eval --model qalora`` alone
cannot work: this imports :mod:`qalora.eval.lm_eval_model` (which registers the model) and then
runs ``lm_eval.__main__.cli_evaluate`` on the same arguments. Every lm-eval option and model
(``--model hf`` too) behaves as under ``lm_eval``.
"""

from __future__ import annotations

import sys

from qalora.errors import QaloraError


def main() -> None:
    """Register ``qalora`` with lm-eval, then hand ``sys.argv`` to lm-eval's CLI. A
    :class:`QaloraError` (missing lm-eval, bad checkpoint, bad option) prints one line, exit 2."""
    try:
        import qalora.eval.lm_eval_model  # noqa: F401  (registers "qalora")
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
    except QaloraError as e:
        print(f"qalora-lm-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
