import pytest

from qalora.errors import QaloraError
from qalora.reproduce.grids import grid_name, grid_names, parse_grid, row_grid


def test_grid_name_and_parse_are_inverse():
    for bits, group in ((2, 32), (3, 32), (4, 64), (8, 192)):
        assert parse_grid(grid_name(bits, group)) == (bits, group)
    assert grid_name(3, 32) == "int3-g32"
    assert grid_names([(4, 64), (2, 32)]) == ["int4-g64", "int2-g32"]


def test_row_grid_is_none_for_a_row_without_bits():
    assert row_grid({"bits": 2, "group_size": 32}) == "int2-g32"
    assert row_grid({"bits": None, "group_size": None}) is None
    assert row_grid({"row": "lora"}) is None


@pytest.mark.parametrize("text", ["int3g32", "INT3-g32", "int3-g", "3-32", "int3-g32 "])
def test_parse_grid_refuses_other_spellings(text):
    with pytest.raises(QaloraError, match="is not of the form intB-gG"):
        parse_grid(text)
