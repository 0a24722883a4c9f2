"""The one layer-spec syntax of every ``--layers`` option (sa_lens/layer_spec.py)."""

from __future__ import annotations

import argparse

import pytest

from sa_lens.errors import InputError
from sa_lens.layer_spec import check_layers, layers_argument, parse_layers


@pytest.mark.parametrize(
    ("spec", "layers"),
    [("4-6", [4, 5, 6]), ("4,5,6", [4, 5, 6]), ("4-6,10", [4, 5, 6, 10]), (" 4 - 6 , 10 ", [4, 5, 6, 10]),
     ("6,4-5,5", [4, 5, 6]), ("3-3", [3]), ("0", [0]), ("10,2", [2, 10])],
)
def test_specs_give_sorted_distinct_layers(spec, layers):
    assert parse_layers(spec) == layers


@pytest.mark.parametrize(
    ("spec", "message"),
    [("6-4", "'6-4' runs backwards; write 4-6"), ("a", "'a' is not a layer number"), ("", "empty"),
     ("  ", "empty"), ("-1", "'-1' is negative"), ("4,,5", "'' is not a layer number"), ("4-", "'4-' is not"),
     ("1.5", "'1.5' is not")],
)
def test_bad_specs_name_the_item_and_the_syntax(spec, message):
    with pytest.raises(InputError, match=message) as info:
        parse_layers(spec)
    assert "4-6" in str(info.value)


def test_out_of_range_layers_name_the_models_range():
    assert parse_layers("0-1", n_layers=2) == [0, 1]
    with pytest.raises(InputError, match=r"layers \[4, 5, 6\] are out of range: the model has 2 decoder layers \(0-1\)"):
        parse_layers("0,4-6", n_layers=2)


def test_check_layers_accepts_the_models_layers_only():
    check_layers([0, 1], 2)
    with pytest.raises(InputError, match=r"\[2\]"):
        check_layers([1, 2], 2)


def test_the_argparse_type_turns_the_error_into_a_usage_error():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=layers_argument)
    assert parser.parse_args(["--layers", "4-6,10"]).layers == [4, 5, 6, 10]
    with pytest.raises(argparse.ArgumentTypeError, match="runs backwards"):
        layers_argument("6-4")
