"""Gold scorers and simulated annotators standing in for human raters of the review world.

The gold score of a text (prompt + response, as one string) is

    gold = sentiment_weight * vader_compound(text) + fluency_weight * fluency(text)
           - repetition_penalty * duplicate_sentences(text)

    fluency(text) =
      -ungrammatical_penalty   degenerate: fewer than `min_words` words, a word repeated
                               back to back ("great great"), or no review of the world starts
                               with these words (unknown word, shuffled words, ...)
      -incomplete_penalty      a grammatical beginning that is not a whole review
                               (truncated: no closing sentence or no final '.')
      fluency_scale * tanh((lp / n - mu) / sigma)   for a whole review, where lp / n is the
                               exact per-word log-likelihood under the world's grammar and
                               mu, sigma its mean and std over `reference_size` reviews
                               sampled from the world

VADER's compound lies in [-1, 1], so with the defaults (weights 1, scale 0.5, penalties 3 and
2) a whole review scores in [-1.5, 1.5] (less for repeated sentences), a truncated one in
[-3, -1] and a degenerate one in [-4, -2]. Text that games VADER ("great great great great",
compound 0.95) therefore scores far below a sincerely negative review: what a proxy reward
model can be fooled into preferring, the gold scorer punishes (Gao et al. 2022's setting).

`SimulatedAnnotator` turns gold scores into noisy pairwise labels with
P(a preferred) = (1 - noise) * sigmoid((gold_a - gold_b) / temperature)
                 + noise * (1 - sigmoid((gold_a - gold_b) / temperature)).
`make_gold_preference_data` writes such labels for the gold reward model's training file.
"""

from __future__ import annotations

import numpy as np

from tasks.reviews import EOS_TOKEN, PAD_TOKEN, write_jsonl


def _texts(texts, name="texts"):
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, got one string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(t).__name__}")
    return texts


def _clean(text):
    # Decoded samples may keep special tokens; they are not part of the review.
    return text.replace(EOS_TOKEN, " ").replace(PAD_TOKEN, " ")


class SentimentFluencyGold:
    """Gold score = VADER sentiment + exact grammar fluency - penalties (see module docstring)."""

    def __init__(
        self,
        world,
        *,
        sentiment_weight=1.0,
        fluency_weight=1.0,
        fluency_scale=0.5,
        ungrammatical_penalty=3.0,
        incomplete_penalty=2.0,
        repetition_penalty=1.0,
        min_words=4,
        reference_size=400,
        reference_seed=12345,
    ):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.world = world
        self.sentiment_weight = float(sentiment_weight)
        self.fluency_weight = float(fluency_weight)
        self.fluency_scale = float(fluency_scale)
        self.ungrammatical_penalty = float(ungrammatical_penalty)
        self.incomplete_penalty = float(incomplete_penalty)
        self.repetition_penalty = float(repetition_penalty)
        self.min_words = int(min_words)
        self._vader = SentimentIntensityAnalyzer()
        reference = world.corpus(reference_size, reference_seed)
        per_word = np.array([world.log_prob(t) / len(world.words(t)) for t in reference])
        self.typical_log_prob = float(per_word.mean())  # mu, nats per word
        self.log_prob_spread = float(max(per_word.std(), 1e-6))  # sigma

    def sentiment(self, text):
        """VADER compound score in [-1, 1]."""
        return float(self._vader.polarity_scores(text)["compound"])

    def components(self, texts):
        """Per-text parts of the gold score, as float32/bool arrays [N] in a dict:
        gold, sentiment, fluency, grammatical (whole review), prefix (grammatical beginning),
        degenerate, log_prob_per_word (nan unless grammatical), duplicate_sentences."""
        texts = [_clean(t) for t in _texts(texts)]
        n = len(texts)
        out = {k: np.zeros(n, np.float32) for k in ("gold", "sentiment", "fluency", "duplicate_sentences")}
        out["log_prob_per_word"] = np.full(n, np.nan, np.float32)
        for k in ("grammatical", "prefix", "degenerate"):
            out[k] = np.zeros(n, bool)
        for i, text in enumerate(texts):
            words = self.world.words(text)
            canonical = " ".join(words)
            repeated = any(a == b for a, b in zip(words, words[1:]))
            lp, prefix_lp = (None, None) if repeated else self.world.log_prob_and_prefix(canonical)
            prefix = prefix_lp is not None
            degenerate = len(words) < self.min_words or repeated or not prefix
            if degenerate:
                fluency = -self.ungrammatical_penalty
            elif lp is None:
                fluency = -self.incomplete_penalty
            else:
                out["log_prob_per_word"][i] = lp / len(words)
                z = (lp / len(words) - self.typical_log_prob) / self.log_prob_spread
                fluency = self.fluency_scale * float(np.tanh(z))
            sentences, current = [], []
            for w in words:  # sentences as word tuples, split after each '.'
                current.append(w)
                if w == ".":
                    sentences.append(tuple(current))
                    current = []
            duplicates = len(sentences) - len(set(sentences))
            sentiment = self.sentiment(canonical)
            out["sentiment"][i] = sentiment
            out["fluency"][i] = fluency
            out["duplicate_sentences"][i] = duplicates
            out["grammatical"][i] = lp is not None and not degenerate
            out["prefix"][i] = prefix
            out["degenerate"][i] = degenerate
            out["gold"][i] = (
                self.sentiment_weight * sentiment + self.fluency_weight * fluency - self.repetition_penalty * duplicates
            )
        return out

    def score(self, texts):
        """Gold scores [N] float32 of full texts (prompt + response)."""
        return self.components(texts)["gold"]

    __call__ = score


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


class SimulatedAnnotator:
    """A rater that prefers a over b with P = sigmoid((gold_a - gold_b) / temperature),
    then flips the label with probability `noise`. temperature=0 gives argmax labels (ties
    broken by a coin). Deterministic given `seed` and the sequence of calls.

    scorer: an object with `score(texts) -> [N]` or a callable texts -> [N]; one with `score_pairs(prompts,
    responses) -> [N]` (e.g. a gold reward model) is asked that way when pairs are labelled (make_pairs_file).
    """

    def __init__(self, scorer, *, temperature=1.0, noise=0.0, seed=0):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be a probability in [0, 1], got {noise}")
        self.scorer = scorer
        self.temperature = float(temperature)
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)

    def gold(self, texts):
        score = getattr(self.scorer, "score", self.scorer)
        return np.asarray(score(_texts(texts)), np.float64)

    def pair_gold(self, prompts, responses):
        """Gold scores [N] of (prompt, response) pairs: the scorer's `score_pairs(prompts, responses)` where it has
        one (a reward model, which tokenises the two apart), else its score of prompt + response."""
        if hasattr(self.scorer, "score_pairs"):
            return np.asarray(self.scorer.score_pairs(list(prompts), list(responses)), np.float64)
        return self.gold([p + r for p, r in zip(prompts, responses)])

    def preference_probability(self, gold_a, gold_b):
        """P(label says a is preferred) [N], noise included."""
        diff = np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)  # [N]
        if self.temperature == 0.0:
            p = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
        else:
            p = _sigmoid(diff / self.temperature)
        return (1.0 - self.noise) * p + self.noise * (1.0 - p)

    def label_scores(self, gold_a, gold_b):
        """Labels [N] bool (True: a preferred) drawn from gold scores."""
        p = self.preference_probability(gold_a, gold_b)
        return self.rng.random(p.shape) < p

    def skip_labels(self, n_pairs: int) -> None:
        """Advance the rng as labelling n_pairs pairs would (one uniform each, see label_scores): a driver that
        finds a label file already written calls this, so that the files it labels next get a fresh run's labels."""
        self.rng.random(int(n_pairs))

    def label(self, texts_a, texts_b):
        """Labels [N] bool (True: a preferred) for two equally long lists of texts."""
        texts_a, texts_b = _texts(texts_a, "texts_a"), _texts(texts_b, "texts_b")
        if len(texts_a) != len(texts_b):
            raise ValueError(f"texts_a has {len(texts_a)} texts but texts_b has {len(texts_b)}")
        return self.label_scores(self.gold(texts_a), self.gold(texts_b))

    def make_pairs_file(self, prompts, responses_a, responses_b, out_path):
        """Labels prompt + response_a against prompt + response_b and writes TRL explicit-prompt
        rows {prompt, chosen, rejected} to out_path (JSONL). Pairs with identical responses are
        skipped (a preference loader rejects them). Returns a dict with labels [N] (True: a
        chosen), gold_a, gold_b [N], and the counts written / skipped_identical."""
        prompts = _texts(prompts, "prompts")
        responses_a, responses_b = _texts(responses_a, "responses_a"), _texts(responses_b, "responses_b")
        if not len(prompts) == len(responses_a) == len(responses_b):
            raise ValueError(
                f"prompts, responses_a, responses_b must be equally long, got "
                f"{len(prompts)}, {len(responses_a)}, {len(responses_b)}"
            )
        gold_a, gold_b = self.pair_gold(prompts, responses_a), self.pair_gold(prompts, responses_b)
        labels = self.label_scores(gold_a, gold_b)
        rows = [
            {"prompt": p, "chosen": a if lab else b, "rejected": b if lab else a}
            for p, a, b, lab in zip(prompts, responses_a, responses_b, labels)
            if a != b
        ]
        written = write_jsonl(rows, out_path)
        return {
            "labels": labels,
            "gold_a": gold_a,
            "gold_b": gold_b,
            "written": written,
            "skipped_identical": len(prompts) - written,
        }


# ---------------------------------------------------------------------- gold preference data

SPAM_WORDS = ("great", "wonderful", "amazing", "awesome", "superb", "perfect", "loved", "brilliant")
PERTURBATIONS = ("repeat_word", "spam", "truncate", "shuffle", "duplicate_sentence", "drop_period", "drop_word")


def perturb(words, kind, rng):
    """A degenerate variant of a response's words (what over-optimised policies write)."""
    words = list(words)
    n = len(words)
    if kind == "repeat_word":
        i = int(rng.integers(n))
        return words[: i + 1] + [words[i]] * int(rng.integers(1, 6)) + words[i + 1 :]
    if kind == "spam":
        spam = [SPAM_WORDS[j] for j in rng.integers(len(SPAM_WORDS), size=int(rng.integers(2, 9)))]
        return spam if rng.random() < 0.5 else words[: int(rng.integers(n + 1))] + spam
    if kind == "truncate":
        return words[: int(rng.integers(1, n))] if n > 1 else words
    if kind == "shuffle":
        return [words[j] for j in rng.permutation(n)]
    if kind == "duplicate_sentence":
        cuts = [0] + [j + 1 for j, w in enumerate(words) if w == "."]
        if len(cuts) < 2:
            return words + words
        k = int(rng.integers(len(cuts) - 1))
        sentence = words[cuts[k] : cuts[k + 1]]
        return words[: cuts[k + 1]] + sentence * int(rng.integers(1, 4)) + words[cuts[k + 1] :]
    if kind == "drop_period":
        return words[:-1] if n > 1 and words[-1] == "." else words
    if kind == "drop_word":
        i = int(rng.integers(n))
        return words[:i] + words[i + 1 :] if n > 1 else words
    raise ValueError(f"unknown perturbation {kind!r}; expected one of {PERTURBATIONS}")


def perturb_responses(world, responses, perturb_prob, rng):
    """Each response replaced with probability perturb_prob by a degenerate variant (`perturb`, a kind drawn
    uniformly from PERTURBATIONS) -> (responses, kinds), kinds 'clean' where it was kept. Responses start with
    a space, as sampled ones do."""
    if not 0.0 <= perturb_prob <= 1.0:
        raise ValueError(f"perturb_prob must be a probability in [0, 1], got {perturb_prob}")
    out, kinds = [], []
    for text in _texts(responses, "responses"):
        kind = "clean"
        if rng.random() < perturb_prob:
            kind = PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]
            words = perturb(world.words(_clean(text)) or ["."], kind, rng) or ["."]
            text = " " + " ".join(words)
        out.append(text)
        kinds.append(kind)
    return out, kinds


def _response(world, prompt, rng, perturb_prob):
    [text], [kind] = perturb_responses(world, [world.sample_continuation(prompt, rng)], perturb_prob, rng)
    return text if text.strip() else " .", kind


def make_gold_preference_data(world, scorer, n_pairs, seed, *, temperature=1.0, noise=0.0, out_path, perturb_prob=0.35):
    """Writes n_pairs TRL explicit-prompt rows {prompt, chosen, rejected} labelled by a
    SimulatedAnnotator(scorer, temperature, noise, seed) to out_path (JSONL).

    Each pair shares a prompt (a review opening from the world); each response is a world
    continuation of it (drawn from P(rest | prompt), so sentiment varies), replaced with
    probability perturb_prob by a degenerate variant (`PERTURBATIONS`: word repetition, sentiment
    spam, truncation, shuffled words, duplicated sentence, dropped period or word), so the
    data also covers what optimised policies produce. Responses start with a space.
    Returns stats: pairs, perturbed (fraction of responses), gold_agreement (fraction of rows
    whose chosen has the higher gold score), mean gold of chosen and rejected, out_path.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    rng = np.random.default_rng([int(seed), 3])
    prompts, responses_a, responses_b, kinds = [], [], [], []
    for prompt in world.prompts(n_pairs, seed):
        a, kind_a = _response(world, prompt, rng, perturb_prob)
        b, kind_b = _response(world, prompt, rng, perturb_prob)
        for _ in range(20):  # identical responses carry no preference: redraw one
            if a != b:
                break
            b, kind_b = _response(world, prompt, rng, perturb_prob)
        prompts.append(prompt)
        responses_a.append(a)
        responses_b.append(b)
        kinds += [kind_a, kind_b]
    annotator = SimulatedAnnotator(scorer, temperature=temperature, noise=noise, seed=[int(seed), 4])
    result = annotator.make_pairs_file(prompts, responses_a, responses_b, out_path)
    keep = np.array([a != b for a, b in zip(responses_a, responses_b)])
    labels, gold_a, gold_b = result["labels"][keep], result["gold_a"][keep], result["gold_b"][keep]
    chosen, rejected = np.where(labels, gold_a, gold_b), np.where(labels, gold_b, gold_a)
    return {
        "pairs": result["written"],
        "skipped_identical": result["skipped_identical"],
        "perturbed": float(np.mean([k != "clean" for k in kinds])),
        "gold_agreement": float(np.mean(chosen > rejected)) if len(chosen) else float("nan"),
        "gold_chosen_mean": float(chosen.mean()) if len(chosen) else float("nan"),
        "gold_rejected_mean": float(rejected.mean()) if len(chosen) else float("nan"),
        "out_path": str(out_path),
    }
