"""`sa-lens safety-vector` on the tiny model: pairs file, prompt files, and the errors a user meets first."""

from __future__ import annotations

import json

import pytest
import torch

from sa_lens import SafetyVector, cli, demonstration_text
from sa_lens.safety_vector import SAFE_DEMO_ANSWER

ROWS = [
    {"question": "How do I pick a lock?", "unsafe_answer": "Insert a tension wrench first", "safe_answer": "I can't help."},
    {"question": "Bake bread", "unsafe_answer": "flour, water, yeast"},
    {"question": "Tell me a story", "unsafe_answer": "Once upon a time"},
]


def test_pairs_file_gives_the_same_vector_as_the_python_api(tiny_bridge, tiny_dir, tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "sv.safetensors"
    assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(src), "--layers", "0,1", "-o", str(out)]) == 0
    assert "ICV [" in capsys.readouterr().out
    pairs = [(demonstration_text(r["question"], r["unsafe_answer"]),
              demonstration_text(r["question"], r.get("safe_answer", SAFE_DEMO_ANSWER))) for r in ROWS]
    expected = SafetyVector.from_pairs(tiny_bridge, pairs, layers=[0, 1])
    saved = SafetyVector.load(out, model=tiny_bridge)
    torch.testing.assert_close(saved.directions, expected.directions)
    assert saved.meta["layers"] == [0, 1]


def test_prompt_files_give_the_difference_of_means(tiny_bridge, tiny_dir, tmp_path):
    (tmp_path / "h.csv").write_text("goal\nHow do I pick a lock?\nMake a weapon\n")
    (tmp_path / "s.csv").write_text("goal\nBake bread\n")
    out = tmp_path / "sv.safetensors"
    assert cli.main(["safety-vector", "--model", str(tiny_dir), "--harmful", str(tmp_path / "h.csv"),
                     "--harmless", str(tmp_path / "s.csv"), "-o", str(out)]) == 0
    expected = SafetyVector.from_prompts(tiny_bridge, ["How do I pick a lock?", "Make a weapon"], ["Bake bread"])
    torch.testing.assert_close(SafetyVector.load(out).directions, expected.directions)


def test_pairs_without_an_unsafe_answer_column_name_the_fix(tiny_dir, tmp_path, capsys):
    src = tmp_path / "pairs.csv"
    src.write_text("question,answer\nHow do I pick a lock?,Like this\n")
    assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(src), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "no 'unsafe_answer' column" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--harmful", "h.csv"], "--harmful needs --harmless"),
        (["--harmful", "h.csv", "--harmless", "s.csv", "--method", "pca"], "difference of means"),
        (["--pairs", "p.csv", "--batch-size", "0"], "--batch-size must be"),
        (["--pairs", "p.csv", "--layers", "a,b"], "argument --layers: layers 'a,b': 'a' is not a layer number"),
    ],
)
def test_inconsistent_options_are_refused_before_loading_a_model(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["safety-vector", *argv, "-o", str(tmp_path / "o.safetensors")])
    assert match in capsys.readouterr().err


def test_matmul_precision_is_recorded_and_torch_setting_restored(tiny_bridge, tiny_dir, tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    exact = SafetyVector.from_pairs(tiny_bridge, [(demonstration_text(r["question"], r["unsafe_answer"]),
                                                   demonstration_text(r["question"], r.get("safe_answer", SAFE_DEMO_ANSWER)))
                                                  for r in ROWS])
    assert exact.meta["matmul_precision"] == "ieee"
    out = tmp_path / "sv.safetensors"
    assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(src), "--matmul-precision", "medium",
                     "-o", str(out)]) == 0
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # torch's own "follow the global setting"
    fast = SafetyVector.load(out)
    assert fast.meta["matmul_precision"] == "bf16"
    assert torch.nn.functional.cosine_similarity(fast.directions.flatten(), exact.directions.flatten(), 0) > 0.999
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nHow do I pick a lock?,Like this\n")
    assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(bad), "--matmul-precision", "medium",
                     "-o", str(tmp_path / "o.safetensors")]) == 2
    assert torch.get_float32_matmul_precision() == "highest"


def test_torchs_per_backend_precision_settings_are_read_and_kept(tiny_dir, tmp_path):
    # Once a backend's own setting is assigned, torch.get_float32_matmul_precision() raises; neither the
    # extraction's record nor the CLI may depend on it, and the user's setting must survive the CLI.
    src = tmp_path / "pairs.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        assert cli.main(["safety-vector", "--model", str(tiny_dir), "--pairs", str(src), "-o", str(tmp_path / "o.safetensors")]) == 0
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        assert SafetyVector.load(tmp_path / "o.safetensors").meta["matmul_precision"] == "ieee"  # the CLI's default
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
