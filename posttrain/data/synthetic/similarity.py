"""Is a generated text new? Exact duplicates, word n-gram near duplicates and ROUGE-L similarity.

Texts are compared as the normalised words of ``posttrain.data.overlap`` (lowercase runs of letters
and digits), the same words ``posttrain data dedup`` and ``data contamination`` use.

ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.1): with
``LCS`` the length of the longest common subsequence of word sequences X (m words) and Y (n words),
R = LCS / m, P = LCS / n and F = (1 + b^2) R P / (R + b^2 P). With b = 1 (the F1 that Self-Instruct
filters on, Wang et al. 2022, section 2.3) this is F = 2 LCS / (m + n).

Near duplicates: the Jaccard similarity |A & B| / |A | B| of the two texts' sets of word n-grams,
which catches reordered copies that ROUGE-L (an in-order measure) scores low.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from posttrain.data.overlap import ngrams, words


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists: 2 LCS / (m + n); 0 when both are empty."""
    if not a and not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@dataclass
class Verdict:
    """Why a text is not new (``reason`` is None when it is), and how close it came to the pool."""

    reason: str | None
    rouge_l: float = 0.0  # the highest ROUGE-L F1 against the texts compared (0 when a repeat check decided first)


class NoveltyPool:
    """Texts kept so far; ``check`` says whether a new text repeats or resembles one of them.

    ``similarity``: reject at ROUGE-L F1 >= this. ``ngram_overlap``: reject at a word ``n``-gram
    Jaccard >= this. ``since`` in ``check`` compares only with texts added from that index on,
    so a batch already checked against the pool needs checking only against its own members.
    """

    def __init__(self, *, similarity: float, ngram_overlap: float, n: int):
        self.similarity = similarity
        self.ngram_overlap = ngram_overlap
        self.n = n
        self.texts: list[list[str]] = []
        self._grams: list[set] = []
        self._exact: dict[str, int] = {}
        self._by_word: dict[str, list[tuple[int, int]]] = {}  # word -> [(text index, times in that text)]
        self._by_gram: dict[tuple, list[int]] = {}

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> int:
        w = words(text)
        index = len(self.texts)
        self.texts.append(w)
        for word, count in Counter(w).items():
            self._by_word.setdefault(word, []).append((index, count))
        grams = ngrams(text, self.n)
        self._grams.append(grams)
        self._exact[" ".join(w)] = index  # the latest index: a repeat added after ``since`` is still found
        for g in grams:
            self._by_gram.setdefault(g, []).append(index)
        return index

    def check(self, text: str, since: int = 0) -> Verdict:
        w = words(text)
        exact = self._exact.get(" ".join(w))
        if exact is not None and exact >= since:
            return Verdict("exact duplicate", 1.0)
        if self._near_duplicate(ngrams(text, self.n), since):
            return Verdict(f"near duplicate ({self.n}-gram Jaccard >= {self.ngram_overlap:g})", 0.0)
        best = 0.0
        for bound, i in self._rouge_bounds(w, since):
            if bound <= best:
                break
            best = max(best, rouge_l(w, self.texts[i]))
        if best >= self.similarity:
            return Verdict(f"similar (ROUGE-L >= {self.similarity:g})", best)
        return Verdict(None, best)

    def _rouge_bounds(self, w: list[str], since: int) -> list[tuple[float, int]]:
        """(upper bound of the ROUGE-L F1, index) of every text sharing a word with ``w``, highest bound first.

        The LCS is at most the words two texts share (with repeats), so F1 <= 2 * shared / (m + n): the
        LCS is computed only while a bound can still beat the best score found, and never for a text
        sharing no word (its F1 is 0).
        """
        shared: Counter = Counter()
        for word, count in Counter(w).items():
            for i, other in self._by_word.get(word, ()):
                if i >= since:
                    shared[i] += min(count, other)
        return sorted(((2 * s / (len(w) + len(self.texts[i])), i) for i, s in shared.items()), reverse=True)

    def _near_duplicate(self, grams: set, since: int) -> bool:
        if not grams:
            return False
        shared: Counter = Counter()
        for g in grams:
            for i in self._by_gram.get(g, ()):
                if i >= since:
                    shared[i] += 1
        return any(common / (len(grams) + len(self._grams[i]) - common) >= self.ngram_overlap
                   for i, common in shared.items())
