"""analyses/transfer.py: the selection rule, and the committed result checked against the protocol it states."""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

ANALYSES = Path(__file__).parents[2] / "analyses"
RESULT = ANALYSES / "results" / "transfer" / "transfer.json"
# A checkout beside ../shared/data finds the public copies; elsewhere point $SA_LENS_SHARED_DATA at them.
SHARED = Path(os.environ.get("SA_LENS_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
sys.path.insert(0, str(ANALYSES))  # the analyses are scripts that import their siblings

import transfer  # noqa: E402


def _row(asr: float, over_refusal: float, utility: float) -> dict:
    return {"asr_macro": asr, "over_refusal": over_refusal, "utility": utility}


def test_choose_takes_the_lowest_macro_asr_within_both_limits():
    original = _row(0.55, 0.067, 0.613)
    rows = {
        "too many refusals": _row(0.01, 0.55, 0.65),
        "at the refusal limit": _row(0.30, 0.067 + 0.05, 0.645),       # +5 points exactly: allowed
        "utility lost": _row(0.20, 0.07, 0.613 - 0.04),
        "same asr, later": _row(0.30, 0.10, 0.62),                       # a tie keeps the first in grid order
    }
    assert transfer.choose(rows, original) == "at the refusal limit"
    assert transfer.choose({"x": rows["too many refusals"]}, original) is None


@pytest.fixture(scope="module")
def result() -> dict:
    return json.loads(RESULT.read_text())


def test_committed_choice_follows_the_stated_rule(result):
    hdr = {k: v for k, v in result["dev_hdr"].items() if k != "Original"}
    assert transfer.choose(hdr, result["dev_hdr"]["Original"]) == result["hdr_choice"]
    sa = {k: v for k, v in result["dev_sa"].items() if k.startswith("SA ")}
    assert transfer.choose(sa, result["dev_sa"]["Original"]) == result["sa_choice"]
    assert result["rule"] == {"max_over_refusal_rise": 0.05, "max_utility_drop": 0.03,
                              "objective": "lowest mean ASR over the dev harm sources"}


def test_no_set_used_for_choosing_is_reported_as_held_out(result):
    roles = {name: meta["role"] for name, meta in result["sources"].items()}
    held = [name for name, role in roles.items() if role == "held out"]
    assert set(transfer.HELD_OUT_HARM) <= set(held) and not set(transfer.DEV_HARM) & set(held)
    for source in transfer.HELD_OUT_HARM:
        assert result["sources"][source]["n"] >= 50
        for state, row in result["held_out"].items():
            assert row[f"asr_{source}_n"] >= 45, (state, source)  # ≥ 50 prompts; a few degenerate replies leave n
            before = result["held_out"]["Original"][f"asr_{source}"]
            assert row[f"relative_cut_{source}"] == pytest.approx((before - row[f"asr_{source}"]) / before)
    # HarmBench's test behaviours come from the source whose val split took part in choosing: said so.
    assert result["sources"]["harmbench-test"]["same_source_as"] == "harmbench-val"


def test_transfer_figure_draws_from_the_committed_result(result, tmp_path):
    import make_figures

    from sa_lens.analysis.figures import save_figure

    figure = make_figures._transfer_figure(result)
    paths = save_figure(figure, tmp_path / "transfer")
    assert all(p.stat().st_size > 10_000 for p in paths)
    assert sum(ax.get_visible() for ax in figure.axes) == len(transfer.DEV_HARM) + len(transfer.HELD_OUT_HARM)


@pytest.mark.skipif(not (SHARED / "jbb-artifacts").is_dir(), reason=f"no public data copies at {SHARED}")
def test_no_held_out_behaviour_repeats_one_used_to_choose(result):
    # By text, not by set name: JBB's behaviours partly come from AdvBench and HarmBench, and PAIR rewrites them.
    sets, pool, dropped = transfer.load_sources(SHARED)
    advbench = transfer.load_public("advbench", SHARED / "advbench")
    used = [p.lower() for name in transfer.DEV_HARM for p in sets[name].prompts]
    used += [advbench.prompts[i].lower() for i in pool[: transfer.N_ICV_POOL]]
    pair = json.loads((SHARED / "jbb-artifacts/PAIR/black_box/vicuna-13b-v1.5.json").read_text())
    goal = {f"pair-{j['index']}": j["goal"] for j in pair["jailbreaks"]}
    for name in transfer.HELD_OUT_HARM:
        behaviours = [goal[i] for i in sets[name].ids] if name == "pair-vicuna" else list(sets[name].prompts)
        for b in behaviours:
            best = max(difflib.SequenceMatcher(None, b.lower(), u).ratio() for u in used)
            assert best < transfer.NEAR_DUPLICATE, (name, b)
        assert result["sources"][name]["n"] == len(sets[name]) >= 50
        assert result["sources"][name]["near_duplicates_dropped"] == dropped[name]
    assert dropped["pair-vicuna"] > 0  # the filter has work to do: PAIR rewrites AdvBench behaviours
