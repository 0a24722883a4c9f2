"""Knowledge-edit requests: what to teach the model, in ROME's (prompt, subject, target) form.

Two row forms are read (:meth:`EditRequest.from_row`, :func:`load_edits`):

- **CounterFact-style** (Meng et al. 2022, the ROME paper's data): ``prompt`` with ``{}`` where the ``subject``
  goes (``"{} is located in the city of"``), ``target_new`` (or ``target``), optional ``target_true``,
  ``paraphrase_prompts`` and ``neighborhood_prompts`` (``{"prompt", "target"}``: facts that must not move).
- **NoIntentEdit-style** (the Safety Arithmetic paper's edit instances, paper-notes.md §6): ``question`` and
  ``answer`` (column names in any case: the paper's file has ``Question``, ``Answer``), optional ``subject`` and
  ``paraphrase``. The rows name no subject, so, as documented here: the
  prompt is the question, the target is the answer, and the subject is the row's ``subject`` when given, else the
  question without its trailing ``?`` and its leading question words (``"What are the effects of bullying?"`` →
  ``"the effects of bullying"``). ROME reads its key at the subject's *last* token, so the derived subject puts
  the key on the question's last word, the topic the question is about.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sa_lens.errors import InputError

__all__ = ["EditRequest", "derive_subject", "load_edits"]

# Leading words of a question that are not its topic: "What are", "How does", "What's", "Can you explain".
_QUESTION_WORDS = re.compile(
    r"^(?:(?:(?:what|who|how|where|when|why|that|it)'s|what|which|who|whom|whose|why|how|when|where|is|are|was|were"
    r"|do|does|did|can|could|should|would|will|has|have|had|explain|describe|tell|me|you|please|much|many|kind|kinds"
    r"|of|the\s+role\s+of)\b|[\s,:;'\"-]+)+",
    re.IGNORECASE,
)


def derive_subject(question: str) -> str:
    """The subject of a NoIntentEdit-style question: the question without its leading question words and without
    its closing punctuation (``"What's the role of enzymes?"`` → ``"enzymes"``).

    Raises:
        ValueError: nothing is left (a question of question words only).
    """
    text = question.strip().rstrip("?.!").strip()
    subject = _QUESTION_WORDS.sub("", text).strip()
    if not subject:
        raise InputError(f"Cannot derive a subject from {question!r}; give the row a 'subject' that occurs in it.")
    return subject


@dataclass(frozen=True)
class EditRequest:
    """One knowledge edit: make the model continue ``prompt`` (with ``subject`` in it) with ``target``.

    Attributes:
        prompt: the text before the answer, with ``{}`` where the subject goes or the subject written out.
        subject: the entity the fact is about; ROME's key is read at its last token (Meng et al. 2022, §3.1).
        target: the new answer. For a raw prompt give it a leading space (``" Rome"``), as the model would write it.
        target_true: the answer the edit replaces, when known (efficacy compares the two).
        paraphrases: other prompts asking the same (generalisation), same ``{}`` convention.
        neighbours: ``(prompt, true answer)`` facts about other subjects that must not change (specificity).
        id: a label for reports.

    Raises:
        ValueError: (on construction) an empty prompt, subject or target, or a subject that does not occur in
            the prompt or a paraphrase — nothing is edited then.
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()
    id: str = ""

    def __post_init__(self) -> None:
        label = f"edit {self.id!r}" if self.id else "edit"
        for name in ("prompt", "subject", "target"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InputError(f"{label}: {name} must be a non-empty string; got {value!r}.")
        if self.target_true is not None and self.target_true.strip() == self.target.strip():
            raise InputError(f"{label}: target equals target_true ({self.target!r}); nothing would change.")
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "neighbours", tuple((str(p), str(t)) for p, t in self.neighbours))
        for text in (self.prompt, *self.paraphrases):
            self.subject_span(text)

    def text(self, prompt: str | None = None) -> str:
        """``prompt`` (default: the edit prompt) with the subject written in."""
        prompt = self.prompt if prompt is None else prompt
        return prompt.replace("{}", self.subject) if "{}" in prompt else prompt

    def subject_span(self, prompt: str | None = None) -> tuple[int, int]:
        """Character span of the subject in :meth:`text` (its last occurrence: the one nearest the answer).

        Raises:
            ValueError: the subject does not occur, or ``{}`` occurs more than once.
        """
        prompt = self.prompt if prompt is None else prompt
        if prompt.count("{}") > 1:
            raise InputError(f"edit {self.id!r}: {prompt!r} has more than one '{{}}'; mark the subject once.")
        text = self.text(prompt)
        start = text.rfind(self.subject)
        if start < 0:
            raise InputError(
                f"edit {self.id!r}: the subject {self.subject!r} does not occur in the prompt {text!r}; "
                "write it into the prompt (or put '{}' where it goes)."
            )
        return start, start + len(self.subject)

    @classmethod
    def from_row(cls, row: Mapping, index: int = 0) -> EditRequest:
        """Build a request from a CounterFact-style or NoIntentEdit-style row (see the module docstring).

        Raises:
            ValueError: a row of neither form, or a bad field (names the row).
        """
        # Column names in any case: the paper's own file (Unintentional_Edit_Instance) has Question, Answer, Cluster.
        row = {**{str(k).lower(): v for k, v in row.items()}, **row}
        rid = str(row.get("id", row.get("case_id", index)))
        if isinstance(row.get("requested_rewrite"), Mapping):  # CounterFact as published (Meng et al. 2022)
            rewrite = row["requested_rewrite"]
            true = rewrite.get("target_true")
            # Its neighbourhood prompts are plain strings about other subjects whose answer is the true target.
            neighbours = [n if isinstance(n, Mapping) or true is None else {"prompt": n, "target": true}
                          for n in row.get("neighborhood_prompts", ())]
            row = {**rewrite, "paraphrase_prompts": row.get("paraphrase_prompts", ()),
                   "neighborhood_prompts": neighbours, "id": rid}
        if "question" in row and "answer" in row:
            question = str(row["question"])
            subject = str(row.get("subject") or derive_subject(question))
            paraphrase = row.get("paraphrase")
            return cls(question, subject, str(row["answer"]), paraphrases=(str(paraphrase),) if paraphrase else (),
                       id=rid)
        target = row.get("target_new", row.get("target"))
        if isinstance(target, Mapping):  # CounterFact's targets: {"str": "Rome", "id": …}
            target = " " + target["str"]
        true = row.get("target_true")
        if isinstance(true, Mapping):
            true = " " + true["str"]
        if "prompt" not in row or "subject" not in row or target is None:
            raise InputError(
                f"edit row {rid}: expected either 'question' and 'answer' (NoIntentEdit-style) or 'prompt', 'subject' "
                f"and 'target_new' (CounterFact-style); got keys {sorted(row)}."
            )
        neighbours = []
        for n in row.get("neighborhood_prompts", row.get("neighbours", ())):
            if isinstance(n, Mapping) and isinstance(n.get("target"), Mapping):
                n = {"prompt": n["prompt"], "target": " " + n["target"]["str"]}
            if not isinstance(n, Mapping) or "prompt" not in n or "target" not in n:
                raise InputError(f"edit row {rid}: each neighbourhood prompt must be {{'prompt': …, 'target': …}}.")
            neighbours.append((n["prompt"], n["target"]))
        return cls(str(row["prompt"]), str(row["subject"]), str(target), None if true is None else str(true),
                   tuple(row.get("paraphrase_prompts", row.get("paraphrases", ()))), tuple(neighbours), rid)


def load_edits(source: str | os.PathLike | Sequence[Mapping]) -> list[EditRequest]:
    """Edit requests from a JSONL / JSON / CSV file (:func:`sa_lens.data.load_records`) or from rows.

    Raises:
        ValueError: no rows, or a row that is not a valid request (every row is checked before any is used); a
            missing or malformed file (:class:`sa_lens.data.DataError`).
    """
    if isinstance(source, (str, os.PathLike)):
        from sa_lens.data import load_records

        rows = load_records(source)
    else:
        rows = list(source)
    if not rows:
        raise InputError(f"{source!s:.80}: no edit rows.")
    return [EditRequest.from_row(r, i) for i, r in enumerate(rows)]
