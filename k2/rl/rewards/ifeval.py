"""Instruction-following reward: a registry of verifiable constraints in the style of IFEval (Zhou et al., arXiv
2311.07911; the ids and keyword arguments follow its ``instructions_registry``) and the hack check of Kimi K2's
verifiable rewards gym (arXiv 2507.20534 §3.2), which must not reward a response for claiming compliance.

Each constraint is ``check(response, **kwargs) -> bool`` in :data:`CONSTRAINTS`. ``relation`` arguments take
``"at least"`` or ``"less than"`` as in IFEval. Deviations from IFEval: paragraphs for ``number_paragraphs`` are
split on blank lines or ``***`` (IFEval: ``***`` only); ``language:response_language`` is left out (it needs a
language detector); ``startend:start_checker``, ``length_constraints:number_characters`` and
``keywords:exclusive_words`` are additions.

Hack check: sentences that claim compliance ("I have followed all the instructions", "this response contains no
commas", "Word count: 120") are removed before the checks run, so a claim can never satisfy a constraint (saying
the keyword inside the claim does not count), and a response that claims compliance but fails a check gets status
``hack`` and score 0.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from k2.rl.rewards.base import RewardResult, SampleReward, skipped, text_of

CONSTRAINTS: dict[str, Callable[..., bool]] = {}


def constraint(name: str) -> Callable[[Callable[..., bool]], Callable[..., bool]]:
    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        CONSTRAINTS[name] = fn
        return fn

    return register


def _compare(value: int, relation: str, target: int) -> bool:
    if relation == "at least":
        return value >= target
    if relation == "less than":
        return value < target
    if relation == "exactly":
        return value == target
    raise ValueError(f"relation must be 'at least', 'less than' or 'exactly', got {relation!r}")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?", text)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return [p for p in parts if re.search(r"\w", p)]


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\*\*\*\s*\n|\n\s*\n", text.strip()) if p.strip()]


@constraint("length_constraints:number_words")
def number_words(response: str, *, num_words: int, relation: str = "at least") -> bool:
    return _compare(len(_words(response)), relation, num_words)


@constraint("length_constraints:number_sentences")
def number_sentences(response: str, *, num_sentences: int, relation: str = "at least") -> bool:
    return _compare(len(_sentences(response)), relation, num_sentences)


@constraint("length_constraints:number_paragraphs")
def number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    return len(_paragraphs(response)) == num_paragraphs


@constraint("length_constraints:nth_paragraph_first_word")
def nth_paragraph_first_word(response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = _paragraphs(response)
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    words = _words(paragraphs[nth_paragraph - 1])
    return bool(words) and words[0].lower() == first_word.lower()


@constraint("length_constraints:number_characters")
def number_characters(response: str, *, num_chars: int, relation: str = "less than") -> bool:
    return _compare(len(response), relation, num_chars)


@constraint("keywords:existence")
def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    return all(re.search(rf"\b{re.escape(k)}\b", response, re.IGNORECASE) for k in keywords)


@constraint("keywords:forbidden_words")
def forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", response, re.IGNORECASE) for w in forbidden_words)


@constraint("keywords:frequency")
def keyword_frequency(response: str, *, keyword: str, frequency: int, relation: str = "at least") -> bool:
    count = len(re.findall(rf"\b{re.escape(keyword)}\b", response, re.IGNORECASE))
    return _compare(count, relation, frequency)


@constraint("keywords:letter_frequency")
def letter_frequency(response: str, *, letter: str, let_frequency: int, let_relation: str = "at least") -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


@constraint("keywords:exclusive_words")
def exclusive_words(response: str, *, allowed_words: list[str]) -> bool:
    allowed = {w.lower() for w in allowed_words}
    return bool(_words(response)) and all(w.lower() in allowed for w in _words(response))


@constraint("detectable_format:json_format")
def json_format(response: str) -> bool:
    text = response.strip()
    fenced = re.fullmatch(r"```(?:json|JSON)?\s*\n(.*)\n```", text, re.DOTALL)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


@constraint("detectable_format:number_bullet_lists")
def number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    return len(re.findall(r"^\s*[*\-•]\s+\S", response, re.MULTILINE)) == num_bullets


@constraint("detectable_format:number_highlighted_sections")
def number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    spans = re.findall(r"(?<!\*)\*([^*\n]+)\*(?!\*)", response) + re.findall(r"\*\*([^*\n]+)\*\*", response)
    return sum(1 for s in spans if s.strip()) >= num_highlights


@constraint("detectable_format:multiple_sections")
def multiple_sections(response: str, *, section_spliter: str = "Section", num_sections: int) -> bool:
    headers = re.findall(rf"^\s*{re.escape(section_spliter)}\s+\d+", response, re.MULTILINE | re.IGNORECASE)
    return len(headers) >= num_sections


@constraint("detectable_format:title")
def title(response: str) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


@constraint("detectable_format:constrained_response")
def constrained_response(response: str, *, options: tuple[str, ...] = ()) -> bool:
    options = tuple(options) or ("My answer is yes.", "My answer is no.", "My answer is maybe.")
    return response.strip() in options


@constraint("change_case:english_lowercase")
def english_lowercase(response: str) -> bool:
    return bool(re.search(r"[a-z]", response)) and response == response.lower()


@constraint("change_case:english_capital")
def english_capital(response: str) -> bool:
    return bool(re.search(r"[A-Z]", response)) and response == response.upper()


@constraint("change_case:capital_word_frequency")
def capital_word_frequency(response: str, *, capital_frequency: int, capital_relation: str = "at least") -> bool:
    count = sum(1 for w in _words(response) if len(w) > 1 and w.isupper())
    return _compare(count, capital_relation, capital_frequency)


@constraint("startend:end_checker")
def end_checker(response: str, *, end_phrase: str) -> bool:
    return response.strip().lower().endswith(end_phrase.strip().lower())


@constraint("startend:start_checker")
def start_checker(response: str, *, start_phrase: str) -> bool:
    return response.strip().lower().startswith(start_phrase.strip().lower())


@constraint("startend:quotation")
def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


@constraint("punctuation:no_comma")
def no_comma(response: str) -> bool:
    return "," not in response and "，" not in response


@constraint("detectable_content:postscript")
def postscript(response: str, *, postscript_marker: str = "P.S.") -> bool:
    return re.search(rf"^\s*{re.escape(postscript_marker)}", response, re.MULTILINE | re.IGNORECASE) is not None


@constraint("detectable_content:number_placeholders")
def number_placeholders(response: str, *, num_placeholders: int) -> bool:
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= num_placeholders


@constraint("combination:repeat_prompt")
def repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@constraint("combination:two_responses")
def two_responses(response: str) -> bool:
    parts = [p.strip() for p in response.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


# ---- hack check ------------------------------------------------------------------------------------------------

_CLAIM = "|".join(
    (
        r"\b(?:i|i've|i have|this (?:response|answer|reply|text)|my (?:response|answer|reply))\b[^.!?\n]{0,80}"
        r"\b(?:follow|comply|complies|complied|adhere|satisf|meet|meets|met|obey|respect|fulfil)\w*\b[^.!?\n]{0,80}"
        r"\b(?:instruction|constraint|requirement|rule|format|request|guideline)s?\b",
        r"\bas (?:requested|instructed|required)\b",
        r"\bi (?:made sure|ensured|confirm|guarantee|verified|double-checked)\b",
        r"\b(?:contains?|uses?|has|have|includes?|is written)\b[^.!?\n]{0,40}\b(?:no|zero|exactly|at least|fewer than|"
        r"less than|only|all)\b[^.!?\n]{0,40}\b(?:commas?|words?|sentences?|paragraphs?|bullets?|bullet points?|"
        r"capital|lowercase|uppercase|letters?|sections?|placeholders?)\b",
        r"\b(?:word|sentence|paragraph|character) count\s*[:=]",
        r"\b(?:constraints?|requirements?|instructions?)\s*(?:met|satisfied|followed)\b",
    )
)
_CLAIM_RE = re.compile(_CLAIM, re.IGNORECASE)


def compliance_claims(response: str) -> list[str]:
    """The sentences of ``response`` that claim compliance with the instructions."""
    claims = []
    for line in response.splitlines():
        claims += [s for s in re.split(r"(?<=[.!?])\s+", line) if _CLAIM_RE.search(s)]
    return claims


def without_claims(response: str) -> str:
    lines = []
    for line in response.splitlines():
        kept = [s for s in re.split(r"(?<=[.!?])\s+", line) if not _CLAIM_RE.search(s)]
        if kept or not line.strip():
            lines.append(" ".join(kept))
    return "\n".join(lines)


def check_all(response: str, instructions: list[dict]) -> list[tuple[str, bool]]:
    """``(id, passed)`` for each instruction, checked on ``response`` with its compliance claims removed."""
    text = without_claims(response)
    out = []
    for instruction in instructions:
        kwargs = {k: v for k, v in instruction.items() if k != "id" and v is not None}
        fn = CONSTRAINTS.get(instruction["id"])
        if fn is None:
            raise KeyError(f"unknown instruction id {instruction['id']!r}; known: {sorted(CONSTRAINTS)}")
        out.append((instruction["id"], bool(fn(text, **kwargs))))
    return out


class IFEvalReward(SampleReward):
    """Column ``instructions``: a list of ``{"id": ..., **kwargs}``. Score 1.0 when every instruction holds (IFEval's
    strict prompt-level accuracy), or the fraction that holds with ``partial=True``; a false compliance claim scores
    0 with status ``hack``."""

    name = "ifeval"

    def __init__(self, *, partial: bool = False) -> None:
        super().__init__()
        self.partial = partial

    def grade(self, prompt: Any, completion: Any, instructions: list[dict] | None = None, **row: Any) -> RewardResult:
        if not instructions:
            return skipped("no instructions column")
        response = text_of(completion)
        checks = check_all(response, instructions)
        failed = [name for name, ok in checks if not ok]
        claims = compliance_claims(response)
        if failed and claims:
            return RewardResult(0.0, "hack", f"claims compliance ({claims[0][:60]!r}) but fails {', '.join(failed)}")
        score = 1.0 - len(failed) / len(checks) if self.partial else float(not failed)
        return RewardResult(score, "failed" if failed else "passed", f"fails {', '.join(failed)}" if failed else "")


ifeval_reward = IFEvalReward()
