"""Built-in synthetic pre-training corpus with a known structure, and the unigram baseline loss.

Four document kinds, mixed uniformly, each with a fixed prefix so the model can tell them apart:

- ``arith``: lines ``a+b=c``, ``a-b=c``, ``a*b=c`` with exact results; three in four are single-digit facts (what
  ``k2 sft``'s tool-free arithmetic restates and ``k2 rl``'s default task rewards), the rest need carries and digit
  alignment;
- ``copy`` / ``rev``: a random letter string, ``|``, then the same string or its reversal (needs attention to
  an exact earlier position);
- ``recall``: key=value pairs, then queries ``key?value`` for keys chosen from the whole list (needs attention
  across the context: the value is not predictable from anything local);
- ``grammar``: sentences of a small English-like context-free grammar with subject–verb number agreement.

Everything is drawn from ``random.Random(seed)``: the same seed gives the same documents on every machine.
A model that learns these rules gets a loss well below ``unigram_baseline_loss`` — the entropy of the token
frequencies, i.e. the best cross-entropy of a model that ignores context.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Iterator

import numpy as np

KINDS = ("arith", "copy", "recall", "grammar")

_DET_SG = ("the", "a", "every", "this")
_DET_PL = ("the", "some", "many", "these")
_ADJ = ("small", "big", "red", "old", "quick", "quiet", "green", "happy")
_NOUN = ("cat", "dog", "bird", "child", "robot", "farmer", "teacher", "river", "tree", "house")
_PLURAL = {"child": "children"}
_VERB = ("see", "chase", "like", "find", "help", "watch", "follow")
_PREP = ("near", "behind", "under", "with")


def _arith(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 8)):
        op = rng.choice("+-*")
        top = 9 if rng.random() < 0.75 else 99 if op == "*" else 999  # mostly single-digit facts
        a, b = rng.randint(0, top), rng.randint(0, top)
        c = a * b if op == "*" else a + b if op == "+" else a - b
        lines.append(f"{a}{op}{b}={c}")
    return "arith:\n" + "\n".join(lines)


def _copy(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 16)))
        rev = rng.random() < 0.5
        lines.append(f"{'rev' if rev else 'copy'} {s}|{s[::-1] if rev else s}")
    return "copy:\n" + "\n".join(lines)


def _recall(rng: random.Random) -> str:
    n = rng.randint(6, 16)
    keys = rng.sample([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase], n)
    values = {k: str(rng.randint(0, 999)) for k in keys}
    queries = [rng.choice(keys) for _ in range(rng.randint(3, 6))]
    pairs = " ".join(f"{k}={values[k]}" for k in keys)
    asks = " ".join(f"{k}?{values[k]}" for k in queries)
    return f"recall: {pairs}\n{asks}"


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    plural = rng.random() < 0.4
    noun = rng.choice(_NOUN)
    words = [rng.choice(_DET_PL if plural else _DET_SG)]
    words += rng.sample(_ADJ, k=rng.choice((0, 0, 1, 1, 2)))
    words.append(_PLURAL.get(noun, noun + "s") if plural else noun)
    if rng.random() < 0.2:  # prepositional modifier: "near a tree"
        words += [rng.choice(_PREP), rng.choice(_DET_SG), rng.choice(_NOUN)]
    return " ".join(words), plural


def _sentence(rng: random.Random) -> str:
    subject, plural = _noun_phrase(rng)
    verb = rng.choice(_VERB)
    verb = verb if plural else (verb + "es" if verb.endswith(("ch", "sh")) else verb + "s")
    obj, _ = _noun_phrase(rng)
    return f"{subject} {verb} {obj} ."


def _grammar(rng: random.Random) -> str:
    return "grammar:\n" + "\n".join(_sentence(rng) for _ in range(rng.randint(2, 5)))


_MAKERS = {"arith": _arith, "copy": _copy, "recall": _recall, "grammar": _grammar}


def iter_documents(seed: int = 0, kinds: Iterable[str] = KINDS) -> Iterator[str]:
    """An endless, deterministic stream of synthetic documents (each a few hundred characters)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in _MAKERS]
    if unknown or not kinds:
        raise ValueError(f"corpus.iter_documents: unknown kinds {unknown}; choose from {KINDS}")
    rng = random.Random(seed)
    while True:
        yield _MAKERS[rng.choice(kinds)](rng)


def generate(num_documents: int, seed: int = 0, kinds: Iterable[str] = KINDS) -> list[str]:
    """The first ``num_documents`` documents of ``iter_documents(seed, kinds)``."""
    if num_documents < 0:
        raise ValueError(f"corpus.generate: num_documents must be >= 0, got {num_documents}")
    it = iter_documents(seed, kinds)
    return [next(it) for _ in range(num_documents)]


def unigram_baseline_loss(tokens: Iterable[int] | np.ndarray) -> float:
    """Entropy (nats/token) of the token frequencies of ``tokens``: the loss of the best context-free model."""
    arr = np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise ValueError("corpus.unigram_baseline_loss: empty token stream")
    if arr.min() < 0:
        raise ValueError("corpus.unigram_baseline_loss: token ids must be non-negative")
    counts = np.bincount(arr)
    p = counts[counts > 0] / arr.size
    return max(0.0, float(-(p * np.log(p)).sum()))
