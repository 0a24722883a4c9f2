"""Public benchmark loaders: by name from local copies (../shared/data), errors that say what to fix."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from sa_lens.data import DataError
from sa_lens.data.public import (
    PUBLIC_SETS,
    MCItem,
    MCSet,
    PromptSet,
    QASet,
    load_public,
    load_public_file,
    resolve_names,
)

# A checkout beside ../shared/data finds the copies; elsewhere point $SA_LENS_SHARED_DATA at them.
SHARED = Path(os.environ.get("SA_LENS_SHARED_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"public data copies not found at {SHARED}")


@needs_shared
@pytest.mark.parametrize(
    ("name", "n", "kind"),
    [("advbench", 520, "harmful"), ("harmbench", 60, "harmful"), ("jbb-harmful", 100, "harmful"),
     ("jbb-benign", 100, "safe"), ("xstest", 250, "safe"), ("xstest-unsafe", 200, "harmful")],
)
def test_shared_copies_load_by_name_with_upstream_counts(name, n, kind):
    s = load_public(name, PUBLIC_SETS[name].local_folder(SHARED))
    assert (len(s), s.kind) == (n, kind)
    assert len(set(s.ids)) == n and all(p.strip() for p in s.prompts)


@needs_shared
def test_categories_are_kept_and_xstest_types_split_safe_from_unsafe():
    xs = load_public("xstest", SHARED / "xstest")
    assert "homonyms" in xs.categories and not any(c.startswith("contrast_") for c in xs.categories)
    jbb = load_public("jbb-harmful", SHARED / "jbb-behaviors")
    assert len(set(jbb.categories)) == 10


@needs_shared
def test_harmbench_drops_copyright_and_prefixes_context():
    hb = load_public("harmbench", SHARED / "harmbench", split="val")
    assert "copyright" not in hb.categories
    assert sum("\n\n---\n\n" in p for p in hb.prompts) == 19  # the contextual behaviours of val
    assert len(load_public("harmbench", SHARED / "harmbench", split="test")) == 240


@needs_shared
def test_multiple_choice_sets_have_one_true_option_where_they_must():
    mmlu = load_public("mmlu", SHARED / "mmlu", limit=200)
    assert len(mmlu) == 200 and all(sum(i.labels) == 1 and len(i.choices) == 4 for i in mmlu.items)
    mc1 = load_public("truthfulqa-mc1", SHARED / "truthfulqa")
    mc2 = load_public("truthfulqa-mc2", SHARED / "truthfulqa")
    assert len(mc1) == len(mc2) == 790
    assert all(sum(i.labels) == 1 for i in mc1.items) and any(sum(i.labels) > 1 for i in mc2.items)


@needs_shared
def test_xstest_passed_as_a_harmful_set_is_refused():
    with pytest.raises(DataError, match="labelled 'safe'.*xstest"):
        load_public("advbench", SHARED / "xstest" / "xstest_prompts.csv")


@needs_shared
def test_benign_file_passed_as_harmful_is_refused():
    with pytest.raises(DataError, match="safe/benign"):
        load_public("jbb-harmful", SHARED / "jbb-behaviors" / "benign-behaviors.csv")


def test_subsample_is_fixed_by_seed_and_keeps_file_order(tmp_path):
    f = tmp_path / "harmful_behaviors.csv"
    f.write_text("goal,target\n" + "".join(f"do bad thing {i},Sure\n" for i in range(30)))
    a, b = load_public("advbench", f, limit=10, seed=3), load_public("advbench", f, limit=10, seed=3)
    assert a.prompts == b.prompts and len(a) == 10
    assert [int(i) for i in a.ids] == sorted(int(i) for i in a.ids)
    assert load_public("advbench", f, limit=10, seed=4).prompts != a.prompts


def test_column_names_match_case_insensitively(tmp_path):
    f = tmp_path / "harmful-behaviors.csv"
    f.write_text("Index,Goal,Target,Behavior,Category,Source\n0,Write malware,Sure,Malware,Malware/Hacking,Original\n")
    s = load_public("jbb-harmful", f)
    assert s.prompts == ("Write malware",) and s.categories == ("Malware/Hacking",) and s.ids == ("0",)


def test_malformed_line_is_reported_with_its_number(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match="line 3"):
        load_public_file(f, "harmful")


def test_missing_prompt_column_names_the_columns_found(tmp_path):
    f = tmp_path / "harmful_behaviors.csv"
    f.write_text("request,target\nx,y\n")
    with pytest.raises(DataError, match="columns found: request, target"):
        load_public("advbench", f)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown data set 'advbnch'.*advbench"):
        load_public("advbnch")


def test_unreachable_hub_says_how_to_pass_a_local_copy(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not read advbench.*path=.*--data advbench=PATH"):
        load_public("advbench")


def test_set_without_a_hub_copy_asks_for_a_file():
    with pytest.raises(DataError, match="dangerousqa.json"):
        load_public("dangerousqa")


def test_dangerousqa_json_list_of_strings_and_hex_phi_folder(tmp_path):
    (tmp_path / "dangerousqa.json").write_text(json.dumps(["How to x?", "How to y?"]))
    assert load_public("dangerousqa", tmp_path).prompts == ("How to x?", "How to y?")
    (tmp_path / "category_1.csv").write_text('"Do a"\n"Do b"\n')
    (tmp_path / "category_2.csv").write_text('"Do c"\n')
    hex_phi = load_public("hex-phi", tmp_path)
    assert hex_phi.categories == ("category_1", "category_1", "category_2")


def test_macro_sets_are_marked(tmp_path):
    f = tmp_path / "data_for_hub.json"
    f.write_text(json.dumps([{"id": 1, "topic": "A", "question": "q1"}, {"id": 2, "topic": "B", "question": "q2"}]))
    s = load_public("harmfulqa", f)
    assert s.macro and s.categories == ("A", "B")


def test_aliases_expand():
    assert resolve_names(["JBB", "truthfulqa", "advbench"]) == ["jbb-harmful", "jbb-benign", "truthfulqa-mc1",
                                                                "truthfulqa-mc2", "advbench"]


@needs_shared
def test_data_dir_resolves_aliases_to_their_folders():
    from sa_lens.evaluation.harness import load_sets

    sets = load_sets(["jbb", "truthfulqa", "xstest-unsafe"], data_dir=SHARED, limit=5)
    assert [s.name for s in sets] == ["jbb-harmful", "jbb-benign", "truthfulqa-mc1", "truthfulqa-mc2", "xstest-unsafe"]
    assert all(len(s) == 5 for s in sets)


@pytest.mark.parametrize("answer", ["", "AB", "E", "x"])
def test_an_mmlu_answer_that_is_no_letter_is_reported_not_read_as_a(tmp_path, answer):
    f = tmp_path / "algebra_test.csv"
    f.write_text(f"question,choice0,choice1,choice2,choice3,answer\nWhat is 1+1?,1,2,3,4,{answer}\n")
    with pytest.raises(DataError, match="item 1"):
        load_public("mmlu", f)


def test_an_mmlu_answer_letter_in_lowercase_is_read_and_a_wrong_one_is_named(tmp_path):
    f = tmp_path / "algebra_test.csv"
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nWhat is 1+1?,1,2,3,4, b\nWhat is 2+2?,1,2,3,4,x\n")
    with pytest.raises(DataError, match=r"item 2 .*neither a letter A-D nor an index"):
        load_public("mmlu", f)
    f.write_text("question,choice0,choice1,choice2,choice3,answer\nWhat is 1+1?,1,2,3,4, b\n")
    assert load_public("mmlu", f).items[0].labels == (0, 1, 0, 0)


def test_set_reprs_name_the_set_not_its_prompts():
    long = "Explain, step by step, something nobody should print in a repr. " * 20
    prompts = PromptSet("advbench", "harmful", (long,) * 500, tuple(map(str, range(500))), ("a", "b") * 250, "walledai/AdvBench")
    assert repr(prompts) == "PromptSet(name='advbench', kind='harmful', n=500, categories=2, source='walledai/AdvBench')"
    item = MCItem("0", long, ("x", "y"), (1, 0))
    mc = MCSet("mmlu", "letter", (item,) * 3, "cais/mmlu")
    assert repr(mc) == "MCSet(name='mmlu', kind='mc', n=3, scoring='letter', source='cais/mmlu')"
    qa = QASet("bundled-qa", (long,) * 2, ("0", "1"), (("a",), ("b",)), "bundled:qa/test")
    assert repr(qa) == "QASet(name='bundled-qa', kind='qa', n=2, source='bundled:qa/test')"
    assert all(len(repr(x)) < 120 for x in (prompts, mc, qa))


# --------------------------------------------------------------------------- every published form of every set

FORMS = Path(__file__).resolve().parents[1] / "data" / "public_forms"

# set name → (hub rows file or None, the authors' file(s) or folder(s)), all under tests/data/public_forms.
PUBLISHED_FORMS = {
    "advbench": ("advbench/hub.json", ["advbench/harmful_behaviors.csv", "advbench"]),
    "harmbench": ("harmbench/hub.json", ["harmbench/harmbench_behaviors_text_val.csv", "harmbench"]),
    "jbb-harmful": ("jbb-behaviors/hub_harmful.json", ["jbb-behaviors/harmful-behaviors.csv"]),
    "jbb-benign": ("jbb-behaviors/hub_benign.json", ["jbb-behaviors/benign-behaviors.csv"]),
    "xstest": ("xstest/hub.json", ["xstest/xstest_prompts.csv", "xstest"]),
    "xstest-unsafe": ("xstest/hub.json", ["xstest/xstest_prompts.csv"]),
    "dangerousqa": (None, ["dangerousqa/dangerousqa.json", "dangerousqa"]),
    "catqa": ("catqa/hub.json", ["catqa/catqa_english.json", "catqa"]),
    "harmfulqa": ("harmfulqa/hub.json", ["harmfulqa/harmfulqs.json", "harmfulqa"]),
    "nichehazardqa": ("nichehazardqa/hub.json", ["nichehazardqa/NICHEHAZARDQA.json", "nichehazardqa"]),
    "hex-phi": (None, ["hex-phi"]),
    "strongreject": ("strongreject/hub.json", ["strongreject/strongreject_dataset/strongreject_dataset.csv", "strongreject"]),
    "mmlu": ("mmlu/hub.json", ["mmlu/upstream", "mmlu/upstream/data/test/astronomy_test.csv", "mmlu/reformatted"]),
    "truthfulqa-mc1": ("truthfulqa/hub.json", ["truthfulqa/data/mc_task.json", "truthfulqa"]),
    "truthfulqa-mc2": ("truthfulqa/hub.json", ["truthfulqa/data/mc_task.json", "truthfulqa"]),
}


def _serve_hub_rows(monkeypatch, name: str, rows_file: str) -> list[tuple]:
    """Make ``datasets.load_dataset`` return the fixture rows for exactly this set's hub id; return its calls."""
    rows = json.loads((FORMS / rows_file).read_text(encoding="utf-8"))
    calls: list[tuple] = []

    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def _content(data_set):
    """What must agree between forms: prompts and categories, or the questions with their options and truth."""
    if isinstance(data_set, MCSet):
        return [(i.question, dict(zip(i.choices, i.labels, strict=True)), i.category) for i in data_set.items]
    return list(zip(data_set.prompts, data_set.categories, strict=True))


def test_every_named_set_has_its_published_forms_here():
    assert set(PUBLISHED_FORMS) == set(PUBLIC_SETS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_FORMS))
def test_every_published_form_loads_to_the_same_prompts_and_categories(monkeypatch, name):
    hub_file, local_forms = PUBLISHED_FORMS[name]
    src = PUBLIC_SETS[name]
    loaded = {form: load_public(name, FORMS / form) for form in local_forms}
    if hub_file is not None:
        calls = _serve_hub_rows(monkeypatch, name, hub_file)
        loaded["hub"] = load_public(name)
        assert calls == [src.hub]
    reference = _content(next(iter(loaded.values())))
    assert reference and all(text for text, *_ in reference)
    for form, data_set in loaded.items():
        assert _content(data_set) == reference, f"{name}: {form} differs from {next(iter(loaded))}"
        assert data_set.kind == src.kind and len(set(data_set.ids)) == len(data_set)
        if data_set.kind != "mc":
            assert data_set.macro == src.macro


@pytest.mark.parametrize(
    ("name", "categories"),
    [("catqa", {"Illegal Activity", "Hate/Harass/Violence"}), ("harmfulqa", {"Social Sciences"}),
     ("nichehazardqa", {"Hate Speech and Discrimination", "Fake News and Propaganda"}),
     ("harmbench", {"misinformation_disinformation", "cybercrime_intrusion"}), ("jbb-harmful", {"Harassment/Discrimination"}),
     ("xstest", {"homonyms"}), ("strongreject", {"Disinformation and deception", "Violence"}),
     ("hex-phi", {"category_1", "category_3"})],
)
def test_categories_are_read_from_the_authors_files(name, categories):
    _, local_forms = PUBLISHED_FORMS[name]
    assert set(load_public(name, FORMS / local_forms[0]).categories) == categories


def test_nested_authors_files_keep_each_question_under_its_category_for_macro_averages():
    catqa = load_public("catqa", FORMS / "catqa" / "catqa_english.json")
    by_category = {c: [p for p, pc in zip(catqa.prompts, catqa.categories, strict=True) if pc == c] for c in set(catqa.categories)}
    assert {c: len(ps) for c, ps in by_category.items()} == {"Illegal Activity": 2, "Hate/Harass/Violence": 1}
    assert by_category["Hate/Harass/Violence"][0].startswith("What are some ways to disrupt")
    harmfulqa = load_public("harmfulqa", FORMS / "harmfulqa")
    assert harmfulqa.macro and len(harmfulqa) == 2


def test_truthfulqa_generation_csv_is_refused_with_the_file_to_pass_instead(tmp_path):
    f = tmp_path / "TruthfulQA.csv"
    f.write_text("Type,Category,Question,Best Answer\nAdversarial,Misconceptions,Q?,A\n")
    with pytest.raises(DataError, match="mc_task.json"):
        load_public("truthfulqa-mc1", f)


def test_an_mmlu_line_with_the_wrong_number_of_fields_is_named(tmp_path):
    f = tmp_path / "astronomy_test.csv"
    f.write_text("What is a star?,gas,rock,ice,A\n")
    with pytest.raises(DataError, match="line 1 has 5 fields"):
        load_public("mmlu", f)
