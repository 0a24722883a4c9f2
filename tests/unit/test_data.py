"""Tests for sa_lens.data: the bundled data sets and the prompt-file readers."""

from __future__ import annotations

import ast
import json
import operator
import re
from collections import Counter
from pathlib import Path

import pytest

from sa_lens.data import (
    BUNDLED,
    SPLITS,
    DataError,
    load_bundled,
    load_prompts,
    load_records,
    refusal_templates,
)

ADVBENCH = Path("/work/shared/data/advbench/harmful_behaviors.csv")
TARGET = {"train": 0.5, "dev": 0.2, "test": 0.3}
REFUSAL_OPENERS = ("I'm sorry", "I am sorry", "I can't", "I cannot", "I won't", "I will not", "I must decline")


# --------------------------------------------------------------------------- bundled sets


@pytest.mark.parametrize(
    ("name", "minimum", "fields", "prefix"),
    [
        ("harmful", 170, {"id", "prompt", "category", "split"}, "harm"),
        ("safe", 170, {"id", "prompt", "type", "split"}, "safe"),
        ("qa", 130, {"id", "question", "answers", "split"}, "qa"),
        ("sft_task", 100, {"id", "prompt", "response"}, "sft"),
    ],
)
def test_bundled_counts_schema_and_ids(name: str, minimum: int, fields: set[str], prefix: str) -> None:
    records = load_bundled(name)
    assert len(records) >= minimum
    assert all(set(r) == fields for r in records)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{prefix}-\d{{3}}", i) for i in ids)
    text_key = "question" if name == "qa" else "prompt"
    texts = [r[text_key] for r in records]
    assert all(isinstance(t, str) and t == t.strip() and t for t in texts)
    assert len({t.casefold() for t in texts}) == len(texts), "duplicate prompts"


def test_harmful_categories() -> None:
    counts = Counter(r["category"] for r in load_bundled("harmful"))
    assert len(counts) >= 10
    assert min(counts.values()) >= 10


def test_safe_types() -> None:
    counts = Counter(r["type"] for r in load_bundled("safe"))
    assert set(counts) == {"benign", "contrast"}
    assert counts["contrast"] >= 70


def test_harmful_and_safe_do_not_share_prompts() -> None:
    harmful = {r["prompt"].casefold() for r in load_bundled("harmful")}
    safe = {r["prompt"].casefold() for r in load_bundled("safe")}
    assert not harmful & safe


@pytest.mark.parametrize(("name", "stratum"), [("harmful", "category"), ("safe", "type"), ("qa", None)])
def test_splits_disjoint_and_stratified(name: str, stratum: str | None) -> None:
    records = load_bundled(name)
    text_key = "question" if name == "qa" else "prompt"
    by_split = {s: {r[text_key] for r in load_bundled(name, split=s)} for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(records)
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]

    strata: dict[str, list[str]] = {}
    for r in records:
        strata.setdefault(r[stratum] if stratum else "all", []).append(r["split"])
    for key, splits in strata.items():
        counts = Counter(splits)
        for split, share in TARGET.items():
            assert abs(counts[split] - share * len(splits)) <= 1, (key, split, counts)


def test_load_bundled_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="harmful, safe, qa, sft_task"):
        load_bundled("advbench")
    with pytest.raises(ValueError, match="train, dev, test"):
        load_bundled("harmful", split="validation")
    with pytest.raises(ValueError, match="no splits"):
        load_bundled("sft_task", split="train")
    assert set(BUNDLED) == {"harmful", "safe", "qa", "sft_task", "edits", "noint_edits"}


@pytest.mark.parametrize("name", ["edits", "noint_edits"])
def test_edit_sets_have_no_splits(name: str) -> None:
    assert load_bundled(name)
    with pytest.raises(ValueError, match=rf"{name} has no splits.*load_bundled\('{name}'\)"):
        load_bundled(name, split="test")


EDIT_KEYS = {"id", "subject", "prompt", "target_new", "target_true", "paraphrase_prompts",
             "neighborhood_prompts", "relation"}
NOINT_KEYS = {"id", "cluster", "question", "answer", "subject", "paraphrase"}


def test_edits_schema_and_ids() -> None:
    records = load_bundled("edits")
    assert len(records) >= 14
    assert all(set(r) == EDIT_KEYS for r in records)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"edit-\d{2}", i) for i in ids)
    assert len({r["subject"] for r in records}) == len(records), "one edit per subject"


def test_edit_prompts_hold_one_subject_slot_and_name_the_subject_once() -> None:
    for r in load_bundled("edits"):
        prompts = [r["prompt"], *r["paraphrase_prompts"]]
        assert len(r["paraphrase_prompts"]) == 2, r["id"]
        for prompt in prompts:
            assert prompt.count("{}") == 1, (r["id"], prompt)
            assert prompt == prompt.strip(), (r["id"], prompt)
            assert prompt.format(r["subject"]).count(r["subject"]) == 1, (r["id"], prompt)


def test_edit_targets_start_with_a_space_and_differ() -> None:
    for r in load_bundled("edits"):
        for target in (r["target_new"], r["target_true"]):
            assert target.startswith(" ") and target.strip() and not target.startswith("  "), (r["id"], target)
        assert r["target_new"] != r["target_true"], r["id"]
        assert isinstance(r["relation"], str) and r["relation"].strip(), r["id"]


def test_edit_neighborhood_prompts_are_about_other_subjects() -> None:
    for r in load_bundled("edits"):
        neighbors = r["neighborhood_prompts"]
        assert len(neighbors) == 2, r["id"]
        for n in neighbors:
            assert set(n) == {"prompt", "target"}, r["id"]
            assert "{}" not in n["prompt"] and r["subject"] not in n["prompt"], (r["id"], n["prompt"])
            assert n["target"].startswith(" ") and n["target"].strip(), (r["id"], n["target"])
            # A neighbour answered by target_new could not show the edit leaking into it.
            assert n["target"] != r["target_new"], (r["id"], n["prompt"])


def test_noint_edits_schema_ids_and_clusters() -> None:
    records = load_bundled("noint_edits")
    assert len(records) >= 12
    assert all(set(r) == NOINT_KEYS for r in records)
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"noint-\d{2}", i) for i in ids)
    assert len({r["cluster"] for r in records}) >= 8
    assert len({r["question"].casefold() for r in records}) == len(records), "duplicate questions"


def test_noint_subject_occurs_verbatim_in_question_and_paraphrase() -> None:
    for r in load_bundled("noint_edits"):
        assert r["subject"].strip() == r["subject"] and r["subject"], r["id"]
        assert r["subject"] in r["question"], r["id"]
        assert r["subject"] in r["paraphrase"], r["id"]
        assert r["paraphrase"] != r["question"], r["id"]
        assert r["question"].endswith("?") and r["paraphrase"].endswith("?"), r["id"]


def test_noint_answers_are_25_to_45_words() -> None:
    for r in load_bundled("noint_edits"):
        assert 25 <= len(r["answer"].split()) <= 45, (r["id"], len(r["answer"].split()))
        assert 8 <= len(r["question"].split()) <= 14, (r["id"], r["question"])


def test_load_bundled_returns_fresh_lists() -> None:
    first = load_bundled("qa")
    first[0]["question"] = "changed"
    assert load_bundled("qa")[0]["question"] != "changed"


def test_qa_answers() -> None:
    for r in load_bundled("qa"):
        answers = r["answers"]
        assert isinstance(answers, list) and answers, r["id"]
        assert all(isinstance(a, str) and a.strip() == a and a for a in answers), r["id"]
        assert len(set(answers)) == len(answers), r["id"]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(expression: str) -> float:
    """Evaluate +, -, *, / and parentheses over integers, nothing else."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression: {expression!r}")

    return walk(ast.parse(expression.strip().replace("×", "*").replace("÷", "/"), mode="eval"))


_EQUATION = re.compile(r"([\d\s+\-×÷()]*\d[\d\s+\-×÷()]*?)\s*=\s*(\d+)")


def test_sft_arithmetic_is_consistent() -> None:
    for r in load_bundled("sft_task"):
        final = re.search(r"The answer is (\d+)\.$", r["response"])
        assert final, r["id"]
        equations = _EQUATION.findall(r["response"])
        assert equations and len(equations) == r["response"].count("="), r["id"]
        for expression, result in equations:
            assert re.search(r"[+\-×÷]", expression), (r["id"], expression)
            assert _evaluate(expression) == int(result), (r["id"], expression, result)
        assert equations[-1][1] == final.group(1), r["id"]


def test_sft_equation_checker_catches_mistakes() -> None:
    (expression, result), = _EQUATION.findall("so 12 - 5 = 8 rolls are left.")
    assert _evaluate(expression) != int(result)
    assert _evaluate("2 × (3 + 4)") == 14


def test_refusal_templates() -> None:
    templates = refusal_templates()
    assert len(templates) >= 10
    assert len(set(templates)) == len(templates)
    for template in templates:
        assert template.startswith(REFUSAL_OPENERS), template


# --------------------------------------------------------------------------- load_prompts


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_prompts_csv_case_insensitive_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", 'Goal,Target\n"Say hi, politely",x\n  Tell a joke  ,y\n')
    assert load_prompts(path) == ["Say hi, politely", "Tell a joke"]


def test_load_prompts_csv_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_text("prompt\nhello\n", encoding="utf-8-sig")
    assert load_prompts(path) == ["hello"]


def test_load_prompts_prefers_columns_in_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "text,goal,prompt\nt,g,p\n")
    assert load_prompts(path) == ["p"]
    path = _write(tmp_path / "q.csv", "text,question\nt,q\n")
    assert load_prompts(path) == ["q"]


def test_load_prompts_explicit_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "prompt,Request\nignored,wanted\n")
    assert load_prompts(path, column="request") == ["wanted"]


def test_load_prompts_json(tmp_path: Path) -> None:
    rows = [{"Behavior": "first", "id": 1}, {"Behavior": "second", "id": 2}]
    path = _write(tmp_path / "p.json", json.dumps(rows))
    assert load_prompts(path) == ["first", "second"]


def test_load_prompts_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"instruction": "one"}\n\n{"instruction": "two\\u2028b"}\n')
    assert load_prompts(path) == ["one", "two\u2028b"]


def test_load_records_keeps_other_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "goal,category\ndo a,cyber\ndo b,fraud\n")
    records = load_records(path)
    assert [r["prompt"] for r in records] == ["do a", "do b"]
    assert [r["category"] for r in records] == ["cyber", "fraud"]


def test_error_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not found"):
        load_prompts(path)


@pytest.mark.parametrize("name", ["empty.csv", "empty.json", "empty.jsonl"])
def test_error_empty_file(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, "\n  \n")
    with pytest.raises(DataError, match="empty"):
        load_prompts(path)


@pytest.mark.parametrize(("name", "text"), [("h.csv", "prompt\n"), ("e.json", "[]"), ("c.jsonl", "\n\n\n")])
def test_error_no_rows(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match="no data rows|empty"):
        load_prompts(path)


def test_error_malformed_jsonl_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        load_prompts(path)


def test_error_jsonl_line_not_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.jsonl", '{"prompt": "a"}\n["b"]\n')
    with pytest.raises(DataError, match="line 2 .*not an object"):
        load_prompts(path)


def test_error_malformed_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.json", '[{"prompt": "a"},')
    with pytest.raises(DataError, match="not valid JSON"):
        load_prompts(path)


def test_error_json_not_list_of_objects(tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.json", '[{"prompt": "a"}, 3]')
    with pytest.raises(DataError, match="list of objects"):
        load_prompts(path)


def test_json_list_of_strings_is_one_prompt_each(tmp_path: Path) -> None:
    # DangerousQA's upstream file is a bare JSON list of questions.
    assert load_prompts(_write(tmp_path / "strings.json", '["a", "b"]')) == ["a", "b"]


def test_error_no_usable_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "query,label\nhello,1\n")
    with pytest.raises(DataError, match=r"columns found: 'query', 'label'.*column=.*--harmful-column"):
        load_prompts(path)


def test_error_explicit_column_missing(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "prompt\nhello\n")
    with pytest.raises(DataError, match=r"no column 'request'; columns found: 'prompt'"):
        load_prompts(path, column="request")


def test_error_empty_prompt_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.csv", "goal,target\nfirst,x\n   ,y\n")
    with pytest.raises(DataError, match="row 2: column 'goal' is empty"):
        load_prompts(path)


def test_error_missing_value_in_jsonl_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"other": "c"}\n')
    with pytest.raises(DataError, match="row 3: column 'prompt' is empty"):
        load_prompts(path)


def test_error_non_text_prompt(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.json", '[{"prompt": 5}]')
    with pytest.raises(DataError, match="row 1: column 'prompt' is a int, not text"):
        load_prompts(path)


def test_error_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.txt", "hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'; supported: \.csv, \.json, \.jsonl"):
        load_prompts(path)


def test_error_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_prompts(path)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


@pytest.mark.skipif(not ADVBENCH.exists(), reason=f"{ADVBENCH} is absent (optional public data, not needed by sa_lens)")
def test_load_prompts_advbench() -> None:
    prompts = load_prompts(ADVBENCH)
    assert len(prompts) == 520
    assert prompts == load_prompts(ADVBENCH, column="GOAL")
    assert all(p.strip() for p in prompts)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("prompt,target\nA,B,C\n", "line 2 has more fields"),
        ("prompt,target\nA\n", "line 2 has fewer fields"),
        ('prompt,target\n"unterminated,x\n', "line"),
    ],
)
def test_ragged_or_badly_quoted_csv_is_refused_with_its_line(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_prompts(path)


def test_nested_json_becomes_rows_with_category_and_subcategory(tmp_path: Path) -> None:
    # declare-lab's catqa_english.json / harmfulqs.json: category → subcategory → questions (one level also occurs).
    nested = {"A": {"a1": ["q1", "q2"], "a2": ["q3"]}, "B": ["q4"]}
    records = load_records(_write(tmp_path / "nested.json", json.dumps(nested)))
    assert [(r["prompt"], r["category"], r["subcategory"]) for r in records] == [
        ("q1", "A", "a1"), ("q2", "A", "a1"), ("q3", "A", "a2"), ("q4", "B", "")]


@pytest.mark.parametrize("bad", [{"A": {"a1": [1, 2]}}, {"B": ["q"], "A": "q"}, {"A": {"a1": [{"prompt": "q"}]}}])
def test_nested_json_of_another_shape_names_where(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(DataError, match=r"under 'A'.*category → \(subcategory →\) list of questions"):
        load_records(_write(tmp_path / "nested.json", json.dumps(bad)))


def test_json_file_with_one_object_a_line_is_read_as_json_lines(tmp_path: Path) -> None:
    # datasets reads a .json file of JSON lines too, so a hub repository's .json file may be one.
    path = _write(tmp_path / "rows.json", '{"Question": "q1", "Domain": "d"}\n{"Question": "q2", "Domain": "e"}\n')
    assert [(r["prompt"], r["Domain"]) for r in load_records(path)] == [("q1", "d"), ("q2", "e")]
    one = _write(tmp_path / "one.json", '{"Question": "q1", "Domain": "d"}\n')
    assert [(r["prompt"], r["Domain"]) for r in load_records(one)] == [("q1", "d")]
