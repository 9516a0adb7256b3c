"""Configuration records: defaults stated once, the rate each method trains at when none is given."""

import pytest

from qalora.adapters.methods import METHODS
from qalora.cli import build_parser
from qalora.config import PipelineConfig, TrainConfig
from qalora.errors import QaloraError


def test_each_method_trains_at_its_own_rate_unless_one_is_given():
    for name, m in METHODS.items():
        assert TrainConfig(method=name).lr == m.lr
        assert TrainConfig(method=name).to_dict()["lr"] == m.lr        # the record holds the rate used
    assert TrainConfig(method="qalora").lr == 2e-3 and TrainConfig(method="lora").lr == 2e-4
    assert TrainConfig(method="qalora", lr=5e-4).lr == 5e-4
    assert PipelineConfig().train_config().lr == METHODS["qalora"].lr
    assert PipelineConfig(lr=1e-3).train_config().lr == 1e-3


@pytest.mark.parametrize("lr", [0, -1e-3, float("nan"), True])
def test_a_rate_that_is_not_positive_is_refused(lr):
    with pytest.raises(QaloraError, match="must be positive"):
        TrainConfig(lr=lr)


def test_the_command_line_states_every_method_rate_and_leaves_it_to_the_method():
    parser = build_parser()
    assert parser.parse_args(["train", "--out", "a"]).lr is None
    assert parser.parse_args(["train", "--out", "a", "--lr", "1e-3"]).lr == 1e-3
    train = next(a for a in parser._subparsers._group_actions[0].choices["train"]._actions if a.dest == "lr")
    assert all(f"{name} {m.lr:g}" in train.help for name, m in METHODS.items()) and "(default: None)" not in train.help
