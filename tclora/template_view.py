"""Template view of instruction sources: the words a task's template fixes, its payload masked.

Why: a multi-task corpus wraps varying payloads (a sentence, a word list, a passage) in a few templates
per task, and a sentence embedding is a mean over all tokens, so the payload can outweigh the
instruction. Measured on the demo (``benchmarks/bench_cluster_quality.py``): with whole sources the
lowest-inertia k-means solution groups rows by payload and template shape (NMI ~0.55 against the
families, for scikit-learn ``KMeans`` as for ours), while the templates alone cluster perfectly.

Method (after SLCT, Vaarandi 2003, "A data clustering algorithm for mining patterns from event logs",
and Drain's constant tokens, He et al. 2017). Positions count from the start and, so templates whose
payload comes first are found too, from the end of the row.
  1. A token is a *template word* when its ``top`` most frequent positions (from the start, or from the
     end) hold >= ``min_cover`` of its occurrences: template words sit in a few fixed places, payload
     words anywhere. On the demo a payload word reaches 2-5% support at some position, above any
     usable support cut, but its top two positions hold < 35% of it; template words 70-100%. The cut,
     0.65, leaves room for chance: in a small corpus a payload word's occurrences are few, and at 40 rows
     per demo family some reached 50-54% in their top two positions (the last words of templates that
     end in the payload), so a 0.5 cut kept them and the 160 rows had 90 distinct views instead of the
     12 templates (0.65: 12; 20 rows per family: 80 -> 23; from 100 rows per family on, 12 either way).
  2. A template word is kept at each position where it has support >= ``min_support`` (fraction of rows).
Every other token is payload; each run of payload becomes ``mask``. A row with no template token keeps
its whole text, so a corpus without frequent templates (free-form prompts) embeds as before.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

FILE = "template_view.json"  # a fitted miner, as the embed stage saves it (TemplateMiner.to_json)
TOKEN_RE = re.compile(r"\w+|[^\w\s]")  # words and single punctuation marks


def tokens(text: str) -> list[str]:
    """Words and punctuation marks of ``text``, in order."""
    return TOKEN_RE.findall(text)


@dataclass(frozen=True)
class TemplateMiner:
    """Frequent (token, position) pairs of a corpus; :meth:`view` masks a source's payload.

    Attributes:
        head: ``(position from start, token)`` pairs with support >= min_support.
        tail: ``(position from end, token)`` pairs (1 = last token) with support >= min_support.
        mask: what a run of payload tokens becomes.
    """

    head: frozenset
    tail: frozenset
    mask: str = "..."

    @classmethod
    def fit(cls, sources: Iterable[str], min_support: float = 0.01, min_cover: float = 0.65, top: int = 2,
            mask: str = "...") -> "TemplateMiner":
        """Count (token, position) pairs over ``sources`` (a sample is enough: both rules are fractions).

        Raises:
            ValueError: ``min_support`` or ``min_cover`` not in (0, 1], ``top`` < 1, or no sources.
        """
        for name, v in (("min_support", min_support), ("min_cover", min_cover)):
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        head: Counter = Counter()
        tail: Counter = Counter()
        total: Counter = Counter()
        n = 0
        for text in sources:
            toks = tokens(text)
            n += 1
            total.update(toks)
            head.update(enumerate(toks))
            tail.update(enumerate(reversed(toks), start=1))
        if n == 0:
            raise ValueError("TemplateMiner.fit: no sources")

        def template_words(pairs: Counter) -> set[str]:
            per_token: dict[str, list[int]] = {}
            for (_, token), c in pairs.items():
                per_token.setdefault(token, []).append(c)
            return {t for t, cs in per_token.items() if sum(sorted(cs)[-top:]) >= min_cover * total[t]}

        words = template_words(head) | template_words(tail)

        def kept(pairs: Counter) -> frozenset:
            return frozenset(p for p, c in pairs.items() if p[1] in words and c >= min_support * n)

        return cls(kept(head), kept(tail), mask)

    def view(self, text: str) -> str:
        """``text`` with payload runs replaced by ``mask``; unchanged when no token is a template token."""
        toks = tokens(text)
        n = len(toks)
        keep = [(i, t) in self.head or (n - i, t) in self.tail for i, t in enumerate(toks)]
        if not any(keep):
            return text
        out: list[str] = []
        for t, k in zip(toks, keep):
            if k:
                out.append(t)
            elif not out or out[-1] != self.mask:
                out.append(self.mask)
        return re.sub(r" (?=[^\w\s.])", "", " ".join(out))  # "words : ..." -> "words: ..." as written

    def views(self, texts: Sequence[str]) -> list[str]:
        """:meth:`view` of each text, in order."""
        return [self.view(t) for t in texts]

    def to_json(self) -> dict:
        """A JSON-able dict (sorted pairs, so the same miner always writes the same bytes)."""
        return {"head": sorted(self.head), "tail": sorted(self.tail), "mask": self.mask}

    @classmethod
    def from_json(cls, data: dict) -> "TemplateMiner":
        """The miner :meth:`to_json` wrote."""
        pairs = lambda key: frozenset((int(pos), str(tok)) for pos, tok in data[key])  # noqa: E731
        return cls(pairs("head"), pairs("tail"), data["mask"])
