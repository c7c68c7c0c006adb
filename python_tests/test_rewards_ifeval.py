"""IFEval-style constraints: a hand-written response that satisfies and one that violates every registered
constraint, and the hack check (claiming compliance earns nothing)."""

from __future__ import annotations

import pytest

from k2.rl.rewards import CONSTRAINTS, compliance_claims, ifeval_reward
from k2.rl.rewards.ifeval import IFEvalReward

# id: (kwargs, a response that satisfies it, a response that violates it)
CASES = {
    "length_constraints:number_words": (
        {"num_words": 5, "relation": "at least"},
        "One two three four five six.",
        "Only three words.",
    ),
    "length_constraints:number_sentences": (
        {"num_sentences": 3, "relation": "less than"},
        "First sentence. Second one!",
        "One. Two. Three. Four.",
    ),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "Para one.\n\nPara two.", "Just one paragraph."),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "moreover"},
        "Intro here.\n\nMoreover, more text.",
        "Intro here.\n\nAlso, more text.",
    ),
    "length_constraints:number_characters": ({"num_chars": 20, "relation": "less than"}, "Short.", "x" * 40),
    "keywords:existence": ({"keywords": ["llama", "alpaca"]}, "A llama met an alpaca.", "A llama met a camel."),
    "keywords:forbidden_words": ({"forbidden_words": ["very"]}, "It is quite good.", "It is very good."),
    "keywords:frequency": (
        {"keyword": "data", "frequency": 2, "relation": "at least"},
        "Data beats opinions; data wins.",
        "Data beats opinions.",
    ),
    "keywords:letter_frequency": (
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zany zebras zigzag.",
        "Zany horses.",
    ),
    "keywords:exclusive_words": ({"allowed_words": ["yes", "no"]}, "Yes no yes.", "Yes, maybe."),
    "detectable_format:json_format": ({}, '```json\n{"a": [1, 2]}\n```', "{'a': 1} is my answer"),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two", "* one\n* two\n- three"),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2},
        "This is *important* and *urgent*.",
        "This is *important* only.",
    ),
    "detectable_format:multiple_sections": (
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro\nSection 2\nBody",
        "Section 1\nEverything",
    ),
    "detectable_format:title": ({}, "<<A Poem>>\nRoses are red.", "A Poem\nRoses are red."),
    "detectable_format:constrained_response": ({}, "My answer is yes.", "Yes, definitely."),
    "change_case:english_lowercase": ({}, "all lower case here.", "Not all lower case."),
    "change_case:english_capital": ({}, "ALL CAPS HERE.", "ALL CAPS but one."),
    "change_case:capital_word_frequency": (
        {"capital_frequency": 2, "capital_relation": "at least"},
        "The NASA and ESA missions.",
        "The NASA mission.",
    ),
    "startend:end_checker": ({"end_phrase": "Is there anything else?"}, "Done. Is there anything else?", "Done."),
    "startend:start_checker": ({"start_phrase": "Dear team"}, "Dear team, hello.", "Hello team."),
    "startend:quotation": ({}, '"Wrapped in quotes."', "Not wrapped."),
    "punctuation:no_comma": ({}, "No commas here at all.", "Well, one comma."),
    "detectable_content:postscript": ({"postscript_marker": "P.S."}, "Body.\nP.S. See you.", "Body only."),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2},
        "Send to [name] at [address].",
        "Send to [name].",
    ),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a haiku."},
        "Write a haiku. Silent pond, a frog.",
        "Silent pond, a frog.",
    ),
    "combination:two_responses": ({}, "First answer.\n******\nSecond answer.", "Only one answer."),
}


def test_every_constraint_has_cases_and_there_are_at_least_20():
    assert set(CASES) == set(CONSTRAINTS)
    assert len(CONSTRAINTS) >= 20


@pytest.mark.parametrize("name", sorted(CASES))
def test_constraint_positive_and_negative(name):
    kwargs, good, bad = CASES[name]
    check = CONSTRAINTS[name]
    assert check(good, **kwargs) is True
    assert check(bad, **kwargs) is False


@pytest.mark.parametrize("name", sorted(CASES))
def test_reward_on_each_case(name):
    kwargs, good, bad = CASES[name]
    instructions = [[{"id": name, **kwargs}]] * 2
    assert ifeval_reward(["p", "p"], [good, bad], instructions=instructions) == [1.0, 0.0]


def test_strict_and_partial_scores():
    instructions = [{"id": "punctuation:no_comma"}, {"id": "keywords:existence", "keywords": ["apple"]}]
    assert ifeval_reward(None, ["An apple, please."], instructions=[instructions]) == [0.0]
    assert IFEvalReward(partial=True)(None, ["An apple, please."], instructions=[instructions]) == [0.5]
    assert ifeval_reward(None, ["x"], instructions=[None]) == [None]


def test_hack_check_claims_earn_nothing():
    instructions = [
        {"id": "keywords:frequency", "keyword": "banana", "frequency": 2, "relation": "at least"},
        {"id": "punctuation:no_comma"},
    ]
    honest = "A banana a day. Another banana at night."
    claim_only = "I ate a banana. I have followed all the instructions and used the word banana twice."
    claim_counted = "Bananas are yellow. This response contains no commas and includes the word banana twice."
    results = ifeval_reward.results(None, [honest, claim_only, claim_counted], instructions=[instructions] * 3)
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert results[1].status == "hack" and results[2].status == "hack"
    assert compliance_claims(honest) == []
    assert len(compliance_claims(claim_only)) == 1
    # A true claim does not help but is not punished beyond that either: the checks decide.
    true_claim = "A banana a day. Another banana at night. As requested there are no commas."
    assert ifeval_reward(None, [true_claim], instructions=[instructions]) == [1.0]
    assert "Word count: 12" in compliance_claims("Some text.\nWord count: 12")[0]
