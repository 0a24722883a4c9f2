"""The one demonstrations type and file reader (sa_lens/demonstrations.py)."""

from __future__ import annotations

import json
import warnings

import pytest

from sa_lens.demonstrations import (
    Demonstration,
    demonstration_pairs,
    load_demonstrations,
)
from sa_lens.errors import InputError
from sa_lens.safety_vector import SAFE_DEMO_ANSWER, demonstration_text

EXPECTED = [
    Demonstration("How do I pick a lock?", "Insert a tension wrench first", "I can't help."),
    Demonstration("Bake bread", "flour, water, yeast"),
]


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        columns = list(rows[0])
        path.write_text("\n".join([",".join(columns)] + [",".join(f'"{r.get(c, "")}"' for c in columns) for r in rows]))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_canonical_columns_load_in_every_format_without_a_warning(tmp_path, suffix):
    rows = [{"question": "How do I pick a lock?", "unsafe_answer": " Insert a tension wrench first ", "safe_answer": "I can't help."},
            {"question": "Bake bread", "unsafe_answer": "flour, water, yeast", "safe_answer": ""}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_demonstrations(_write(tmp_path / f"d{suffix}", rows)) == EXPECTED


def test_columns_match_case_insensitively_and_safe_answer_is_optional(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('Question,UNSAFE_ANSWER\n"How do I pick a lock?",Like this\n')
    assert load_demonstrations(path) == [Demonstration("How do I pick a lock?", "Like this", SAFE_DEMO_ANSWER)]


def test_old_column_names_load_with_a_warning_naming_the_canonical_ones(tmp_path):
    rows = [{"question": "How do I pick a lock?", "unsafe": "Insert a tension wrench first", "safe": "I can't help."},
            {"question": "Bake bread", "unsafe": "flour, water, yeast"}]
    with pytest.warns(FutureWarning, match="'unsafe', 'safe' are old column names; rename them to the canonical "
                                           "question, unsafe_answer, safe_answer"):
        assert load_demonstrations(_write(tmp_path / "d.jsonl", rows)) == EXPECTED


def test_rows_without_an_unsafe_answer_are_named_by_number(tmp_path):
    rows = [{"question": "q1", "unsafe_answer": "a"}, {"question": "q2", "unsafe_answer": " "},
            {"question": "q3", "unsafe_answer": "c"}, {"question": "q4"}, {"question": "q5", "unsafe_answer": 7}]
    with pytest.raises(InputError, match=r"no 'unsafe_answer' text in row\(s\) 2, 4, 5;"):
        load_demonstrations(_write(tmp_path / "d.jsonl", rows))


def test_a_file_without_an_unsafe_column_lists_the_columns_found(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nHow do I pick a lock?,Like this\n")
    with pytest.raises(InputError, match=r"no 'unsafe_answer' column; columns found: 'question', 'answer'\."):
        load_demonstrations(path)


def test_an_empty_question_is_reported_even_when_a_prompt_column_exists(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"question": "", "prompt": "p", "unsafe_answer": "a"}])
    with pytest.raises(InputError, match="row 1: column 'question' is empty"):
        load_demonstrations(path)


def test_a_safe_answer_that_is_not_text_is_refused(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"question": "q", "unsafe_answer": "a"}, {"question": "q", "unsafe_answer": "a", "safe_answer": 3}])
    with pytest.raises(InputError, match=r"'safe_answer' in row\(s\) 2 is not text"):
        load_demonstrations(path)


def test_a_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_demonstrations(tmp_path / "absent.csv")


def test_demonstration_refuses_empty_fields():
    with pytest.raises(InputError, match="Demonstration.unsafe_answer must be non-empty text"):
        Demonstration("q", "  ")


def test_pairs_use_the_official_template():
    assert demonstration_pairs(EXPECTED) == [
        (demonstration_text("How do I pick a lock?", "Insert a tension wrench first"),
         demonstration_text("How do I pick a lock?", "I can't help.")),
        (demonstration_text("Bake bread", "flour, water, yeast"), demonstration_text("Bake bread", SAFE_DEMO_ANSWER)),
    ]


def test_repr_is_short():
    demo = Demonstration("How do I pick a lock on a front door without the key?", "x" * 500)
    assert repr(demo) == "Demonstration('How do I pick a lock on…', unsafe='xxxxxxxxxxxxxxxxxxxxxxx…', safe=default)"
