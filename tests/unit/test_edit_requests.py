"""sa_lens.edit_requests: both row forms, the derived NoIntentEdit subject, refusals that name the problem, and
load_edits on a file and on the bundled edit sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sa_lens.data import load_bundled
from sa_lens.edit_requests import EditRequest, derive_subject, load_edits
from sa_lens.errors import InputError

COUNTERFACT = {
    "id": "cf-1", "prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": " Rome",
    "target_true": " Paris", "paraphrase_prompts": ["{} stands in the city of"],
    "neighborhood_prompts": [{"prompt": "The Louvre is located in the city of", "target": " Paris"}],
}
NOINTENT = {"id": "ni-1", "question": "What are the effects of bullying?", "answer": "Anxiety and low self-esteem.",
            "paraphrase": "Name the effects of bullying."}


def test_a_counterfact_row_becomes_a_request_with_its_paraphrases_and_neighbours():
    r = EditRequest.from_row(COUNTERFACT)
    assert (r.prompt, r.subject, r.target, r.target_true, r.id) == (
        "{} is located in the city of", "The Eiffel Tower", " Rome", " Paris", "cf-1")
    assert r.paraphrases == ("{} stands in the city of",)
    assert r.neighbours == (("The Louvre is located in the city of", " Paris"),)
    assert r.text() == "The Eiffel Tower is located in the city of"
    assert r.text(r.paraphrases[0]) == "The Eiffel Tower stands in the city of"
    assert r.subject_span() == (0, len("The Eiffel Tower"))


def test_a_counterfact_row_may_name_the_target_target():
    row = {k: v for k, v in COUNTERFACT.items() if k != "target_new"} | {"target": " Rome"}
    assert EditRequest.from_row(row).target == " Rome"


def test_counterfacts_nested_targets_are_read_with_a_leading_space():
    row = COUNTERFACT | {"target_new": {"str": "Rome", "id": "Q220"}, "target_true": {"str": "Paris", "id": "Q90"}}
    r = EditRequest.from_row(row)
    assert (r.target, r.target_true) == (" Rome", " Paris")


def test_a_nointentedit_row_reads_question_answer_and_derives_the_subject():
    r = EditRequest.from_row(NOINTENT)
    assert (r.prompt, r.target, r.subject, r.id) == (
        NOINTENT["question"], NOINTENT["answer"], "the effects of bullying", "ni-1")
    assert r.paraphrases == (NOINTENT["paraphrase"],) and r.target_true is None
    assert r.text() == NOINTENT["question"]  # no '{}': the subject is written out
    start, end = r.subject_span()
    assert NOINTENT["question"][start:end] == "the effects of bullying"


def test_the_papers_own_capitalised_columns_are_read(tmp_path):
    # Unintentional_Edit_Instance.xlsx / its CSV and JSONL copies: columns Cluster, Question, Answer.
    row = {"Cluster": "Bullying", "Question": "What are the long-term effects of bullying on victims?",
           "Answer": "Lasting anxiety."}
    path = tmp_path / "Unintentional_Edit_Instance.csv"
    path.write_text('Cluster,Question,Answer\nBullying,What are the long-term effects of bullying on victims?,'
                    'Lasting anxiety.\n')
    want = EditRequest(row["Question"], "the long-term effects of bullying on victims", "Lasting anxiety.", id="0")
    assert EditRequest.from_row(row) == want and load_edits(path) == [want]


def test_the_shared_nointentedit_file_loads_whole():
    folder = Path(__file__).resolve().parents[3] / "shared" / "data" / "nointentedit"
    if not folder.is_dir():
        pytest.skip(f"the public NoIntentEdit copy is not at {folder}")
    for suffix in ("csv", "jsonl"):
        assert len(load_edits(folder / f"Unintentional_Edit_Instance.{suffix}")) == 43  # paper-notes.md §6.2


def test_a_nointentedit_rows_own_subject_wins():
    r = EditRequest.from_row({"question": "How can school bullying shape a child?", "answer": "In many ways.",
                              "subject": "school bullying"})
    assert r.subject == "school bullying"


@pytest.mark.parametrize(
    ("question", "subject"),
    [
        ("What are the effects of bullying?", "the effects of bullying"),
        ("How does photosynthesis work?", "photosynthesis work"),
        ("Why do cats purr?", "cats purr"),
        ("What is the role of the liver?", "the liver"),
        ("Can you explain the role of insulin?", "insulin"),
        ("Explain quantum tunnelling", "quantum tunnelling"),
    ],
)
def test_derive_subject_drops_leading_question_words_and_the_question_mark(question, subject):
    assert derive_subject(question) == subject


def test_a_question_of_question_words_only_has_no_subject():
    with pytest.raises(InputError, match="Cannot derive a subject from 'What is\\?'"):
        derive_subject("What is?")


def test_a_subject_not_in_the_prompt_is_refused_by_name():
    with pytest.raises(InputError, match="'The Colosseum' does not occur"):
        EditRequest.from_row(COUNTERFACT | {"prompt": "The Eiffel Tower is located in the city of",
                                            "subject": "The Colosseum", "paraphrase_prompts": []})
    with pytest.raises(InputError, match="'the ocean' does not occur"):
        EditRequest("Tell me about the sea", "the ocean", " blue")


def test_a_subject_missing_from_a_paraphrase_is_refused():
    with pytest.raises(InputError, match="does not occur in the prompt 'It stands in the city of'"):
        EditRequest.from_row(COUNTERFACT | {"paraphrase_prompts": ["It stands in the city of"]})


def test_two_subject_marks_are_refused():
    with pytest.raises(InputError, match="more than one '\\{\\}'"):
        EditRequest("{} is near {}", "Paris", " Rome")


def test_a_target_equal_to_the_true_answer_is_refused():
    with pytest.raises(InputError, match="target equals target_true"):
        EditRequest.from_row(COUNTERFACT | {"target_new": "Paris "})


@pytest.mark.parametrize("field", ["prompt", "subject", "target"])
def test_empty_fields_are_refused_by_name(field):
    fields = dict(prompt="{} is in", subject="Paris", target=" France") | {field: "  "}
    with pytest.raises(InputError, match=f"{field} must be a non-empty string"):
        EditRequest(**fields)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "{} is in", "subject": "Paris"}, "expected either 'question' and 'answer'"),
        ({"text": "hello"}, "got keys \\['text'\\]"),
        (COUNTERFACT | {"neighborhood_prompts": ["The Louvre is in"]}, "neighbourhood prompt"),
    ],
)
def test_rows_of_neither_form_are_refused_with_the_row_named(row, message):
    with pytest.raises(InputError, match=message):
        EditRequest.from_row(row, 7)


@pytest.mark.parametrize("row", [COUNTERFACT, NOINTENT], ids=["counterfact", "nointentedit"])
def test_load_edits_reads_a_jsonl_file(tmp_path, row):
    second = row | {"id": "two"}
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (row, second)) + "\n")
    got = load_edits(path)
    assert got == [EditRequest.from_row(row), EditRequest.from_row(second)] == load_edits([row, second])
    assert [r.id for r in got] == [row["id"], "two"]


def test_load_edits_checks_every_row_and_refuses_no_rows(tmp_path):
    with pytest.raises(InputError, match="no edit rows"):
        load_edits([])
    with pytest.raises(InputError, match="edit row 1"):
        load_edits([COUNTERFACT, {"prompt": "x"}])
    with pytest.raises(InputError, match="file not found"):
        load_edits(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["edits", "noint_edits"])
def test_every_bundled_edit_row_is_a_valid_request(name):
    rows = load_bundled(name)
    requests = load_edits(rows)
    assert len(requests) == len(rows) >= 10
    assert len({r.id for r in requests}) == len(requests)
    for r in requests:
        start, end = r.subject_span()
        assert r.text()[start:end] == r.subject
    if name == "edits":  # CounterFact-style: every fact has the answer it replaces, paraphrases and neighbours
        assert all(r.target_true and r.paraphrases and r.neighbours for r in requests)


@pytest.mark.parametrize(("question", "subject"), [
    ("Explain the role of enzymes.", "enzymes"),
    ("What's the capital of France?", "the capital of France"),
    ("Tell me: what is love?", "love"),
])
def test_derived_subjects_carry_no_punctuation_or_contraction(question, subject):
    assert derive_subject(question) == subject


def test_counterfact_as_published_reads_with_its_nested_rewrite_and_string_neighbours():
    row = {"case_id": 0,
           "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                 "target_new": {"str": "English", "id": "Q1860"},
                                 "target_true": {"str": "French", "id": "Q150"}},
           "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
           "neighborhood_prompts": ["The mother tongue of Léon Blum is"]}
    r = EditRequest.from_row(row)
    assert (r.prompt, r.subject, r.target, r.target_true, r.id) == (
        "The mother tongue of {} is", "Danielle Darrieux", " English", " French", "0")
    assert r.paraphrases == ("Shayna does this. Danielle Darrieux spoke the language",)
    assert r.neighbours == (("The mother tongue of Léon Blum is", " French"),)
