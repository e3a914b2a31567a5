"""Tests of the synthetic review world (tasks/reviews.py) and its gold scorers (tasks/gold.py)."""

import functools
import json
import math

import numpy as np
import pytest

from tasks import gold as gold_lib
from tasks import lexicon, reviews


@pytest.fixture(scope="module")
def world():
    return reviews.ReviewWorld(seed=0)


@pytest.fixture(scope="module")
def scorer(world):
    return gold_lib.SentimentFluencyGold(world, reference_size=200)


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_from_its_seeds(world):
    again = reviews.ReviewWorld(seed=0)
    other = reviews.ReviewWorld(seed=1)
    corpus = world.corpus(40, seed=3)
    assert corpus == again.corpus(40, seed=3)
    assert world.prompts(40, seed=3) == again.prompts(40, seed=3)
    assert corpus != world.corpus(40, seed=4)
    assert corpus != other.corpus(40, seed=3)
    assert world.log_prob(corpus[0]) != other.log_prob(corpus[0])  # different worlds, different numbers
    assert len(world.vocabulary) >= 300


def test_samples_prompts_and_continuations_are_grammatical(world):
    corpus = world.corpus(300, seed=1)
    assert all(world.is_grammatical(t) for t in corpus)
    assert all(t == " ".join(t.split()) and t.endswith(" .") for t in corpus)  # canonical spacing
    rng = np.random.default_rng(0)
    for prompt in world.prompts(100, seed=1):
        words = prompt.split()
        assert 2 <= len(words) <= 5 and "." not in words
        assert world.is_grammatical_prefix(prompt) and not world.is_grammatical(prompt)
        continuation = world.sample_continuation(prompt, rng)
        assert continuation.startswith(" ") and world.is_grammatical(prompt + continuation)


def test_log_prob_of_a_tiny_grammar_by_hand():
    rules = {"S": [(3, "the A ."), (1, "the B .", 1.5), (2, "a A B")], "L": [(1, "x L"), (3, "y")]}
    classes = {"A": [("good", 3.0), ("bad", -1.5)], "B": [("good", 0.0), ("fine", 0.0, 3.0)]}
    g = reviews.Grammar(rules, classes, start="S", grid=(0.0, 1.0), beta=2.0)
    # P(rule | s) ∝ w exp(beta s pol), pol = clip(valence / 3): weights 3, e^s, 2.
    rule = lambda s: np.array([3.0, math.exp(s), 2.0]) / (5.0 + math.exp(s))  # noqa: E731
    good_a = lambda s: math.exp(2 * s) / (math.exp(2 * s) + math.exp(-s))  # noqa: E731  pol +1 and -0.5
    good_b, fine_b = 0.25, 0.75  # base weights 1 : 3
    by_hand = {
        "the good .": [rule(s)[0] * good_a(s) + rule(s)[1] * good_b for s in (0.0, 1.0)],  # two derivations
        "the fine .": [rule(s)[1] * fine_b for s in (0.0, 1.0)],
        "a bad fine": [rule(s)[2] * (1 - good_a(s)) * fine_b for s in (0.0, 1.0)],
    }
    for text, per_s in by_hand.items():
        assert g.log_prob(text.split()) == pytest.approx(math.log(0.5 * sum(per_s)), abs=1e-12), text
    assert g.prefix_log_prob("a".split()) == pytest.approx(math.log(0.5 * (rule(0)[2] + rule(1)[2])), abs=1e-12)
    assert g.log_prob("the bad".split()) is None and g.prefix_log_prob("the bad".split()) is not None
    assert g.log_prob("a fine good".split()) is None and g.prefix_log_prob("a fine good".split()) is None
    posterior = g.sentiment_posterior("the good .".split())
    np.testing.assert_allclose(posterior, np.array(by_hand["the good ."]) / sum(by_hand["the good ."]), atol=1e-12)
    # Tail recursion is a loop: P(x x y) = (1/4)^2 (3/4).
    loop = reviews.Grammar(rules, classes, start="L", grid=(0.0,))
    assert loop.log_prob("x x y".split()) == pytest.approx(math.log(0.25**2 * 0.75), abs=1e-12)
    with pytest.raises(ValueError, match="tail recursion"):
        reviews.Grammar({"S": [(1, "x S y"), (1, "y")]}, {}, start="S")
    with pytest.raises(ValueError, match="unknown grammar symbol"):
        reviews.Grammar({"S": [(1, "x TYPO")]}, {}, start="S")


def _reference_log_prob(rules, classes, words, grid, beta):
    """Independent inside algorithm over the rules themselves (no automaton): the probability of
    every way each symbol derives each span, memoised top-down, then marginalised over s."""
    grid = np.asarray(grid, float)
    pol = lambda v: np.clip(np.asarray(v, float) / 3.0, -1, 1)  # noqa: E731
    rule_p = {}
    for nt, rs in rules.items():
        logits = np.array([[math.log(r[0]) + beta * s * pol(r[2] if len(r) > 2 else 0) for s in grid] for r in rs])
        rule_p[nt] = np.exp(logits) / np.exp(logits).sum(0)
    emit = {}
    for name, entries in classes.items():
        for sign, key in ((1, name), (-1, "~" + name)):
            logits = np.array(
                [[math.log(e[2] if len(e) > 2 else 1.0) + beta * s * sign * pol(e[1]) for s in grid] for e in entries]
            )
            probs = np.exp(logits) / np.exp(logits).sum(0)
            emit[key] = {e[0]: probs[i] for i, e in enumerate(entries)}

    @functools.cache
    def span(symbol, i):  # {j: P(symbol derives words[i:j]) [G]}
        if symbol in rules:
            out = {}
            for r, p in zip(rules[symbol], rule_p[symbol]):
                for j, v in sequence(tuple(r[1].split()), i).items():
                    out[j] = out.get(j, 0.0) + p * v
            return out
        if i < len(words):
            if symbol in emit:
                return {i + 1: emit[symbol][words[i]]} if words[i] in emit[symbol] else {}
            return {i + 1: np.ones(len(grid))} if symbol == words[i] else {}
        return {}

    def sequence(symbols, i):
        frontier = {i: np.ones(len(grid))}
        for symbol in symbols:
            nxt = {}
            for k, v in frontier.items():
                for j, u in span(symbol, k).items():
                    nxt[j] = nxt.get(j, 0.0) + v * u
            frontier = nxt
        return frontier

    total = span("REVIEW", 0).get(len(words))
    return None if total is None else math.log(float(np.mean(total)))


def test_log_prob_matches_an_independent_inside_algorithm():
    # The unjittered world grammar, so the reference builds its probabilities from RULES alone.
    grammar = reviews.Grammar(lexicon.RULES, lexicon.CLASSES, start="REVIEW")
    rng = np.random.default_rng(5)
    texts = [w for w in (grammar.sample(rng)[0] for _ in range(40)) if len(w) <= 22][:4]  # short: a slow reference
    texts += [t[:-1] for t in texts[:2]] + [t[:3] + t[4:] for t in texts[:2]]  # incomplete, word dropped
    for words in texts:
        expected = _reference_log_prob(lexicon.RULES, lexicon.CLASSES, words, lexicon.GRID, lexicon.BETA)
        got = grammar.log_prob(words)
        if expected is None:
            assert got is None, " ".join(words)
        else:
            assert got == pytest.approx(expected, abs=1e-9), " ".join(words)


def test_prefix_probabilities_are_consistent(world):
    # P(prefix) = P(prefix is a whole review) + sum over next words v of P(prefix + v): exact.
    for prefix in ["", "this", "i watched the movie and", "this film was great ."]:
        total = sum(
            math.exp(lp) for v in world.vocabulary if (lp := world.prefix_log_prob(f"{prefix} {v}")) is not None
        )
        complete = world.log_prob(prefix)
        total += 0.0 if complete is None else math.exp(complete)
        expected = 1.0 if not prefix else math.exp(world.prefix_log_prob(prefix))
        assert total == pytest.approx(expected, rel=1e-9), prefix
    # And the sampler agrees with the parser (Monte Carlo, 2000 draws).
    starts = np.mean([t.startswith("this ") for t in world.corpus(2000, seed=9)])
    assert starts == pytest.approx(math.exp(world.prefix_log_prob("this")), abs=0.035)


def test_ungrammatical_text_is_detected(world):
    good = "this film was great . the acting was superb . i would recommend it ."
    assert world.is_grammatical(good)
    for bad in [
        "film this was great . the acting was superb . i would recommend it .",  # shuffled
        "this film was grate . the acting was superb . i would recommend it .",  # unknown word
        "this film was great great . the acting was superb . i would recommend it .",  # repetition
        "great great great great",
        "",
    ]:
        assert not world.is_grammatical(bad) and world.log_prob(bad) is None, bad
    truncated = good[:-2]  # no closing period: a grammatical beginning, not a review
    assert not world.is_grammatical(truncated) and world.is_grammatical_prefix(truncated)
    assert world.log_prob(
        "  this film   was great . the acting was superb . i would recommend it . "
    ) == world.log_prob(good)  # spacing is not part of the grammar


# ----------------------------------------------------------------------------- tokenizer and files


def test_tokenizer_round_trips_and_loads(world, tmp_path):
    import transformers

    out = reviews.train_tokenizer(world.corpus(600, seed=2), tmp_path / "tok", vocab_size=512)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 512
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    texts = world.corpus(300, seed=3)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert [tok.decode(i) for i in ids] == texts
    rng = np.random.default_rng(1)
    for prompt in world.prompts(30, seed=3):  # prompt and response tokenised apart = together
        response = world.sample_continuation(prompt, rng)
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert encode(prompt) + encode(response) == encode(prompt + response)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>\nhi\n<|assistant|>\n"


def test_jsonl_writers(world, tmp_path):
    assert reviews.write_corpus_jsonl(tmp_path / "c.jsonl", 5, 1, world=world) == 5
    assert reviews.write_prompts_jsonl(tmp_path / "sub" / "p.jsonl", 4, 1, world=world) == 4
    rows = [json.loads(line) for line in open(tmp_path / "c.jsonl")]
    assert rows == [{"text": t} for t in world.corpus(5, 1)]
    rows = [json.loads(line) for line in open(tmp_path / "sub" / "p.jsonl")]
    assert rows == [{"prompt": p} for p in world.prompts(4, 1)]
    with pytest.raises(TypeError, match="row 1"):
        reviews.write_jsonl([{"a": 1}, "oops"], tmp_path / "bad.jsonl")


# ----------------------------------------------------------------------------- gold scorer


def test_gold_ranks_hand_written_reviews(world, scorer):
    texts = [
        "i went to see this musical with my sister and we adored it . the songs were utterly charming , "
        "and the cast felt wonderful . ten out of ten .",
        "this documentary was typical . the pacing was quiet . five out of ten .",
        "this western was dreadful . the dialogue felt tedious , and the ending was pathetic . "
        "do not waste your time .",
        "great great great great",
    ]
    parts = scorer.components(texts)
    assert parts["grammatical"].tolist() == [True, True, True, False]
    assert parts["degenerate"].tolist() == [False, False, False, True]
    gold = parts["gold"]
    assert gold[0] > gold[1] > gold[2] > gold[3], gold
    # The formula, recomputed from VADER and the exact log-likelihood.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    for text, got in zip(texts[:3], gold[:3]):
        z = (world.log_prob(text) / len(text.split()) - scorer.typical_log_prob) / scorer.log_prob_spread
        assert got == pytest.approx(vader.polarity_scores(text)["compound"] + 0.5 * math.tanh(z), abs=1e-5)
    assert gold[3] == pytest.approx(vader.polarity_scores(texts[3])["compound"] - 3.0, abs=1e-5)


def test_gold_penalises_gamed_text_below_honest_negative_reviews(world, scorer):
    negative = "this drama was awful . i hated the plot . one out of ten ."
    gamed = [
        "this drama was great . the plot was great . the plot was great . the plot was great . ten out of ten .",
        "this drama was wonderful . the plot was amazing , and the cast",  # truncated
        "drama this wonderful was . plot the amazing was . ten of out ten .",  # shuffled
        "this drama was great <|endoftext|>",
        "",
    ]
    gold = scorer.score([negative] + gamed)
    assert (gold[1:] < gold[0]).all(), gold
    assert scorer.components([gamed[0]])["duplicate_sentences"][0] == 2
    # Spacing and special tokens do not change the score.
    assert scorer.score([negative.replace(" ", "  ") + "<|endoftext|>"])[0] == pytest.approx(gold[0], abs=1e-6)


# ----------------------------------------------------------------------------- annotator


class _TableScorer:
    def __init__(self, table):
        self.table = table

    def score(self, texts):
        return np.array([self.table[t] for t in texts])


def test_annotator_matches_sigmoid_probabilities():
    diffs = [-2.0, -0.5, 0.0, 0.5, 2.0]
    scorer = _TableScorer({f"a{i}": d for i, d in enumerate(diffs)} | {"b": 0.0})
    n = 4000
    for temperature, noise in [(0.7, 0.0), (1.0, 0.1)]:
        annotator = gold_lib.SimulatedAnnotator(scorer, temperature=temperature, noise=noise, seed=0)
        for i, d in enumerate(diffs):
            p = 1.0 / (1.0 + math.exp(-d / temperature))
            p = (1 - noise) * p + noise * (1 - p)
            labels = annotator.label([f"a{i}"] * n, ["b"] * n)
            assert labels.dtype == bool and labels.mean() == pytest.approx(p, abs=0.03), (temperature, d)
    # Noise alone flips deterministic (temperature 0) labels at its rate; ties are coin flips.
    annotator = gold_lib.SimulatedAnnotator(scorer, temperature=0.0, noise=0.2, seed=1)
    assert annotator.label(["a4"] * n, ["b"] * n).mean() == pytest.approx(0.8, abs=0.03)
    assert annotator.label(["a0"] * n, ["b"] * n).mean() == pytest.approx(0.2, abs=0.03)
    assert annotator.label(["a2"] * n, ["b"] * n).mean() == pytest.approx(0.5, abs=0.03)
    same = [gold_lib.SimulatedAnnotator(scorer, noise=0.3, seed=7).label(["a1"] * 50, ["b"] * 50) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    with pytest.raises(ValueError, match="texts_a has 2"):
        annotator.label(["a0", "a1"], ["b"])


def test_pairs_files(world, scorer, tmp_path):
    annotator = gold_lib.SimulatedAnnotator(scorer, temperature=0.0, seed=0)
    prompts = ["this film was"] * 3
    result = annotator.make_pairs_file(
        prompts,
        [" great . i loved the plot . ten out of ten .", " bad", " same"],
        [" awful . i hated the plot . one out of ten .", " good . the plot was fine . ten out of ten .", " same"],
        tmp_path / "pairs.jsonl",
    )
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert result["written"] == 2 and result["skipped_identical"] == 1
    assert rows[0] == {
        "prompt": "this film was",
        "chosen": " great . i loved the plot . ten out of ten .",
        "rejected": " awful . i hated the plot . one out of ten .",
    }
    assert rows[1]["chosen"] == " good . the plot was fine . ten out of ten ."  # complete beats truncated

    stats = gold_lib.make_gold_preference_data(
        world, scorer, 60, seed=0, temperature=0.0, out_path=tmp_path / "gold.jsonl"
    )
    rows = [json.loads(line) for line in open(tmp_path / "gold.jsonl")]
    assert stats["pairs"] == len(rows) == 60 and 0.15 < stats["perturbed"] < 0.55
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["chosen"] != row["rejected"]
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert world.is_grammatical_prefix(row["prompt"])
    gold_chosen = scorer.score([r["prompt"] + r["chosen"] for r in rows])
    gold_rejected = scorer.score([r["prompt"] + r["rejected"] for r in rows])
    assert (gold_chosen >= gold_rejected).all()  # temperature 0, no noise: the better one wins
    assert (
        gold_lib.make_gold_preference_data(
            world, scorer, 60, seed=0, temperature=0.0, out_path=tmp_path / "again.jsonl"
        )["pairs"]
        == 60
    )
    assert open(tmp_path / "again.jsonl").read() == open(tmp_path / "gold.jsonl").read()


def test_perturbed_responses_are_the_degenerate_kinds_they_name(world, scorer):
    prompts = world.prompts(400, seed=5)
    rng = np.random.default_rng(0)
    clean = [world.sample_continuation(p, rng) for p in prompts]
    kept, kinds = gold_lib.perturb_responses(world, clean, 0.0, np.random.default_rng(1))
    assert kept == clean and set(kinds) == {"clean"}
    out, kinds = gold_lib.perturb_responses(world, clean, 0.3, np.random.default_rng(1))
    again, _ = gold_lib.perturb_responses(world, clean, 0.3, np.random.default_rng(1))
    assert out == again  # deterministic given the rng
    n_perturbed = sum(k != "clean" for k in kinds)
    assert abs(n_perturbed - 0.3 * 400) < 4 * math.sqrt(400 * 0.3 * 0.7)  # binomial(400, 0.3), 4 sigma
    assert all(r == c for r, c, k in zip(out, clean, kinds) if k == "clean")
    assert all(r.startswith(" ") for r in out)
    parts = scorer.components([p + r for p, r in zip(prompts, out)])
    for i, kind in enumerate(kinds):
        words = world.words(out[i])
        if kind == "repeat_word":  # a word back to back: degenerate by the gold's rule
            assert any(a == b for a, b in zip(words, words[1:])) and parts["degenerate"][i]
        if kind == "duplicate_sentence" and "." in world.words(clean[i]):  # else the words are doubled
            # Counted on the response alone: its first sentence, completing the prompt's, is not repeated in the full text.
            assert scorer.components([out[i]])["duplicate_sentences"][0] >= 1
        if kind == "drop_period" and world.words(clean[i])[-1] == ".":
            assert words == world.words(clean[i])[:-1] and not parts["grammatical"][i]
    with pytest.raises(ValueError, match="perturb_prob"):
        gold_lib.perturb_responses(world, clean, 1.5, rng)
