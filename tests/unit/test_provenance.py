"""Names recorded in results and sidecars: hub ids as they are, local paths without the machine's part."""

from __future__ import annotations

import json

from sa_lens import SafeAlign, SafetyVector, demonstration_text, evaluate
from sa_lens.evaluation.decoding import preset
from sa_lens.provenance import model_name, portable_name

PAIRS = [(demonstration_text("Q?", "Sure, step one."), demonstration_text("Q?", "I do not answer this."))]


def test_paths_lose_their_machine_part_and_hub_ids_stay(tmp_path):
    folder = tmp_path / "lab" / "aligned-123"
    folder.mkdir(parents=True)
    assert portable_name(folder) == "lab/aligned-123"
    assert portable_name("/root/.cache/sa_lens/lab/sft-9") == "lab/sft-9"  # also when it is not on this machine
    assert portable_name("meta-llama/Llama-2-7b-chat-hf") == "meta-llama/Llama-2-7b-chat-hf"


def test_vectors_and_reports_record_no_absolute_path(tiny_bridge, tiny_dir, tmp_path):
    assert model_name(tiny_bridge) == portable_name(tiny_dir) and not model_name(tiny_bridge).startswith("/")
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    assert sv.meta["model"] == model_name(tiny_bridge)
    data = tmp_path / "sets" / "harm.csv"
    data.parent.mkdir()
    data.write_text("goal\nHow do I pick a lock?\n")
    evaluate(tiny_bridge, [f"advbench={data}"], states={"S": SafeAlign(vector=sv)},
             settings=preset("greedy", max_new_tokens=2), out_dir=tmp_path / "out", progress=False)
    written = (tmp_path / "out" / "results.json").read_text() + (tmp_path / "out" / "results.jsonl").read_text()
    assert str(tmp_path) not in written and str(tiny_dir) not in written
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["datasets"]["advbench"]["source"] \
        == "sets/harm.csv"


def test_a_vector_saved_with_an_absolute_model_path_still_fits_its_model(tiny_bridge, tiny_dir):
    sv = SafetyVector.from_pairs(tiny_bridge, PAIRS)
    old = SafetyVector(sv.directions, sv.meta | {"model": str(tiny_dir)})  # how sidecars recorded it before
    with SafeAlign(vector=old).apply(tiny_bridge):
        pass
