"""What every `sa-lens` command shares: one demonstrations file, one --layers syntax, one way to report errors."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

from sa_lens import HarmVector, SafetyVector, cli
from sa_lens.commands import evaluate, safety_vector
from sa_lens.demonstrations import Demonstration, demonstration_pairs
from sa_lens.errors import InputError

DEMOS = [Demonstration("How do I pick a lock?", "Insert a tension wrench first", "I can't help."),
         Demonstration("Bake bread", "flour, water, yeast")]
CANONICAL = [{"question": "How do I pick a lock?", "unsafe_answer": "Insert a tension wrench first", "safe_answer": "I can't help."},
             {"question": "Bake bread", "unsafe_answer": "flour, water, yeast"}]
OLD = [{"question": "How do I pick a lock?", "unsafe": "Insert a tension wrench first", "safe": "I can't help."},
       {"question": "Bake bread", "unsafe": "flour, water, yeast"}]


def _run_args(pairs) -> argparse.Namespace:
    """`sa-lens run`'s own parser on a --pairs file (the rest of a run is covered in test_harness.py)."""
    parser = argparse.ArgumentParser()
    evaluate.register(parser.add_subparsers())
    return parser.parse_args(["run", "--target", "T", "--base", "B", "--harmful", "H", "--pairs", str(pairs), "--data", "advbench"])


@pytest.fixture(params=["canonical", "old"])
def demonstrations_file(request, tmp_path):
    rows = CANONICAL if request.param == "canonical" else OLD
    path = tmp_path / f"{request.param}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, request.param == "old"


def test_one_demonstrations_file_is_read_alike_by_safety_vector_and_run(demonstrations_file, tiny_bridge, tiny_dir, tmp_path):
    path, old = demonstrations_file
    out = tmp_path / "sv.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(path), "-o", str(out)]) == 0
        run_pairs = evaluate._pairs(_run_args(path), harmful_path="never loaded: --pairs is given")
    renamed = [str(w.message) for w in caught if w.category is FutureWarning]
    assert len(renamed) == (2 if old else 0)  # once per command
    assert all("rename them to the canonical question, unsafe_answer, safe_answer" in m for m in renamed)
    assert run_pairs == demonstration_pairs(DEMOS)
    expected = SafetyVector.from_pairs(tiny_bridge, demonstration_pairs(DEMOS))
    torch.testing.assert_close(SafetyVector.load(out).directions, expected.directions)


def _layer_commands(tiny_dir, tiny_dir_other, tmp_path, spec):
    """Every command with --layers, each on the 2-layer tiny model, writing ``<command>.safetensors``."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in CANONICAL))
    return {
        "harm-vector": ["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other), "--layers", spec,
                        "-o", str(tmp_path / "harm-vector.safetensors")],
        "safety-vector": ["safety-vector", "--model", str(tiny_dir), "--pairs", str(pairs), "--layers", spec,
                          "-o", str(tmp_path / "safety-vector.safetensors")],
    }


def test_every_layers_option_reads_a_range(tiny_dir, tiny_dir_other, tmp_path):
    for command, argv in _layer_commands(tiny_dir, tiny_dir_other, tmp_path, "0-1").items():
        assert cli.main(argv) == 0, command
    assert HarmVector.load(tmp_path / "harm-vector.safetensors").meta["layers"] == [0, 1]
    assert SafetyVector.load(tmp_path / "safety-vector.safetensors").meta["layers"] == [0, 1]


def test_every_layers_option_names_the_models_range(tiny_dir, tiny_dir_other, tmp_path, capsys):
    for command, argv in _layer_commands(tiny_dir, tiny_dir_other, tmp_path, "1, 4-6").items():
        assert cli.main(argv) == 2, command
        last_line = capsys.readouterr().err.splitlines()[-1]  # after any weight-loading bar
        assert last_line == f"sa-lens {command}: layers [4, 5, 6] are out of range: the model has 2 decoder layers (0-1)."


def test_every_layers_option_refuses_a_backward_range_as_a_usage_error(tiny_dir, tiny_dir_other, tmp_path, capsys):
    for command, argv in _layer_commands(tiny_dir, tiny_dir_other, tmp_path, "6-4").items():
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, command
        assert "argument --layers: layers '6-4': '6-4' runs backwards; write 4-6." in capsys.readouterr().err


def test_an_input_error_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    def refuse(args, parser):
        raise InputError("pairs.csv: row 3 has no unsafe answer; fill it in.")

    monkeypatch.setattr(safety_vector, "_extract", refuse)
    assert cli.main(["safety-vector", "--pairs", "pairs.csv", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert capsys.readouterr().err == "sa-lens safety-vector: pairs.csv: row 3 has no unsafe answer; fill it in.\n"


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("not raised on purpose")])
def test_any_other_exception_keeps_its_traceback(bug, monkeypatch, tmp_path, capsys):
    def crash(args, parser):
        raise bug

    monkeypatch.setattr(safety_vector, "_extract", crash)
    with pytest.raises(type(bug)) as info:
        cli.main(["safety-vector", "--pairs", "pairs.csv", "-o", str(tmp_path / "o.safetensors")])
    assert info.value is bug and capsys.readouterr().err == ""
