"""`sa-lens harm-vector` and `sa-lens apply` on tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import sa_lens
from sa_lens import HarmVector, checkpoint_parameters, cli


def test_harm_vector_then_apply_writes_the_edited_checkpoint(tiny_dir, tiny_dir_other, tmp_path, capsys):
    out = tmp_path / "hv.safetensors"
    assert cli.main(["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other), "--top-k", "0.1",
                     "--lam", "3", "-o", str(out)]) == 0
    assert json.loads((tmp_path / "hv.json").read_text())["meta"]["top_k"] == 0.1
    assert cli.main(["apply", "--target", str(tiny_dir), "--harm-vector", str(out), "--lam", "2", "-o", str(tmp_path / "edited")]) == 0
    assert "weights changed" in capsys.readouterr().out

    base, _ = sa_lens.load_hf_model(tiny_dir)
    edited, _ = sa_lens.load_hf_model(tmp_path / "edited")
    hv = HarmVector.load(out)
    pb, pe = checkpoint_parameters(base), checkpoint_parameters(edited)
    for name, delta in hv.items():
        assert torch.equal(pe[name], torch.where(delta != 0, pb[name] - 2.0 * delta, pb[name])), name


def test_apply_with_a_vector_for_another_model_fails_with_the_fix(tiny_dir, tmp_path, capsys):
    path = HarmVector({"transformer.h.0.w": torch.ones(3)}).save(tmp_path / "other.safetensors")
    assert cli.main(["apply", "--target", str(tiny_dir), "--harm-vector", str(path), "-o", str(tmp_path / "o")]) == 2
    assert "restrict=True" in capsys.readouterr().err


def test_harm_vector_streams_local_folders_with_layer_and_kind_options(tiny_dir, tiny_dir_other, tmp_path, capsys):
    out = tmp_path / "hv.safetensors"
    assert cli.main(["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other), "--layers", "1",
                     "--kinds", "mlp,attention", "-o", str(out)]) == 0
    hv = HarmVector.load(out)
    assert hv and all(n.startswith("model.layers.1.") and (".mlp." in n or ".self_attn." in n) for n in hv)
    assert hv.meta["layers"] == [1] and hv.meta["kinds"] == ["attention", "mlp"]
    assert "τH top-k" in capsys.readouterr().err  # the streaming build's progress bar


def test_harm_vector_restricted_to_the_detected_edit_area(tiny_dir, tiny_dir_other, tmp_path, capsys):
    model, tokenizer = sa_lens.load_hf_model(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "edited")
    out = tmp_path / "hv.safetensors"
    assert cli.main(["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other),
                     "--edit-area", str(tmp_path / "edited"), "-o", str(out)]) == 0
    assert "Edit area: layers [0, 1] (changed: [0])" in capsys.readouterr().out
    assert HarmVector.load(out).meta["layers"] == [0, 1]


@pytest.mark.parametrize(("option", "message"), [(["--layers", "a-b"], "'a-b' is not a layer number or a low-high range"), (["--kinds", "heads"], "unknown kind")])
def test_bad_layer_or_kind_options_are_usage_errors(tiny_dir, tmp_path, option, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir), *option, "-o", str(tmp_path / "x.safetensors")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

def test_trace_heads_writes_the_head_report(tiny_dir, tiny_dir_other, tmp_path, capsys):
    hv = tmp_path / "hv.safetensors"
    assert cli.main(["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other), "--no-trim", "-o", str(hv)]) == 0
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Explain how to pick a lock"}\n{"prompt": "Write a poem about the sea"}\n')
    out = tmp_path / "report"
    args = ["trace-heads", "--model", str(tiny_dir), "--harm-vector", str(hv), "--harmful", str(prompts),
            "--harmless", str(prompts), "-n", "2", "--patch", "2", "--top", "2", "-o", str(out)]
    # The tiny vocabulary splits "Sorry" and "Sure" into the same first piece: the error says so.
    assert cli.main(args) == 2
    assert "both the refusal and the compliance" in capsys.readouterr().err
    assert cli.main([*args, "--refusal-tokens", "I", "--compliance-tokens", "H,T"]) == 0
    for name in ("heads.csv", "heads_activation.png", "heads_activation.pdf", "views.html", "weights_heads.csv",
                 "heads_weights.png", "agreement.csv", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["top_heads"]["dla_diff"]) == 2
    assert {r["n"] for r in summary["agreement"]} == {8}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--layers", "1,9"], "the model has 2 decoder layers"),  # a typo must not shrink τH silently
        (["-o", "hv.pt"], "end in .safetensors"),  # said before the build, not after it
        (["--edit-area", "/no/such/folder"], "no such checkpoint folder"),  # not sent to the hub as an id
    ],
)
def test_bad_harm_vector_options_are_refused_before_the_build(tiny_dir, tiny_dir_other, tmp_path, option, message, capsys, monkeypatch):
    from sa_lens.harm_vector import HarmVector as HV

    monkeypatch.setattr(HV, "from_checkpoints", lambda *a, **k: pytest.fail("built before checking the options"))
    argv = ["harm-vector", "--base", str(tiny_dir), "--harmful", str(tiny_dir_other), "-o", str(tmp_path / "x.safetensors")]
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv + option) == 2
    assert message in capsys.readouterr().err
