"""A procedurally generated world of short film and product reviews, with exact likelihoods.

The world is a small probabilistic grammar whose choices depend on a latent sentiment s,
drawn uniformly from a grid on [-1, 1] (`GRID`). A word w of a word class is chosen with
probability  P(w | s) ∝ base(w) * exp(beta * s * polarity(w)),  and a rule r of a
nonterminal with  P(r | s) ∝ weight(r) * exp(beta * s * polarity(r)); polarities are given
on VADER's valence scale (-4..4) and mapped to [-1, 1] by clip(v / 3). A '~' in front of a
class name flips its polarities (used after 'not': a happy reviewer writes "not boring").

Texts are lowercase words and punctuation separated by single spaces, e.g.
  "this film was great . the acting was not boring . i would recommend it ."
Prompts are the first 2-5 words of a review (never reaching the first '.'); continuations
start with a space, so prompt + continuation is again canonical and BPE tokenises the two
parts exactly as it tokenises the joined text.

The grammar is regular (recursion only in tail position), so it compiles into a weighted
finite-state automaton whose arcs each emit one word and carry a weight per grid point.
`log_prob` is the forward algorithm on that automaton, summing over every derivation and
marginalising s: exact, and a few thousand reviews a second on one CPU core.
"""

from __future__ import annotations

import bisect
import json
import os
import random

import numpy as np

from tasks.lexicon import BETA, CLASSES, GRID, RULES

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _polarity(valence):
    return np.clip(np.asarray(valence, np.float64) / 3.0, -1.0, 1.0)


class Grammar:
    """A sentiment-conditioned regular grammar compiled to a weighted automaton.

    Args:
      rules: {nonterminal: [(weight, rhs) or (weight, rhs, valence)]}; rhs is a space-separated
        string; a nonterminal may call itself only as the last symbol of its own rule.
      classes: {name: [(word, valence) or (word, valence, base_weight)]}.
      start: the start nonterminal.
      grid: latent sentiment values (uniform prior); beta: strength of the sentiment bias.
    """

    def __init__(self, rules, classes, *, start, grid=GRID, beta=BETA):
        self.grid = np.asarray(grid, np.float64)  # [G]
        self.prior = np.full(len(self.grid), 1.0 / len(self.grid))  # [G]
        self.beta = float(beta)
        self.rules = {
            nt: self._normalise([(r[0], r[2] if len(r) > 2 else 0.0) for r in rs], nt) for nt, rs in rules.items()
        }
        self.rhs = {nt: [r[1].split() for r in rs] for nt, rs in rules.items()}
        self.emissions, self.class_words = {}, {}
        for name, entries in classes.items():
            words = [e[0] for e in entries]
            if len(set(words)) != len(words):
                raise ValueError(f"class {name}: repeated words")
            pol = _polarity([e[1] for e in entries])  # [W]
            base = np.array([e[2] if len(e) > 2 else 1.0 for e in entries])
            for flipped in (False, True):
                logits = np.log(base)[:, None] + self.beta * (-pol if flipped else pol)[:, None] * self.grid
                probs = np.exp(logits - logits.max(0))
                self.emissions[("~" if flipped else "") + name] = probs / probs.sum(0)  # [W, G]
            self.class_words[name] = words
        self._compile(start)

    def _normalise(self, weight_valence, nt):
        w = np.array([wv[0] for wv in weight_valence], np.float64)
        if not len(w) or (w <= 0).any():
            raise ValueError(f"nonterminal {nt}: rule weights must be positive, got {w.tolist()}")
        logits = np.log(w)[:, None] + self.beta * _polarity([wv[1] for wv in weight_valence])[:, None] * self.grid
        p = np.exp(logits - logits.max(0))
        return p / p.sum(0)  # [R, G]

    def symbol_kind(self, token):
        """'nonterminal', 'class' (also for '~class') or 'literal'."""
        if token in self.rules:
            return "nonterminal"
        if token.lstrip("~") in self.class_words:
            return "class"
        if any(c.isupper() for c in token):
            raise ValueError(f"unknown grammar symbol {token!r}: not a nonterminal or word class")
        return "literal"

    def _compile(self, start):
        ones = np.ones(len(self.grid))
        eps, emit = [[]], [[]]  # per state: [(dst, w[G])], [(dst, symbol, w[G])]

        def new_state():
            eps.append([]), emit.append([])
            return len(eps) - 1

        def build(nt, entry, exit_, stack):
            for weights, rhs in zip(self.rules[nt], self.rhs[nt]):
                cur = new_state()
                eps[entry].append((cur, weights))
                for i, tok in enumerate(rhs):
                    kind = self.symbol_kind(tok)
                    if tok == nt and i == len(rhs) - 1:  # tail call: loop back, same exit
                        eps[cur].append((entry, ones))
                        cur = None
                    elif kind == "nonterminal":
                        if tok in stack:
                            raise ValueError(f"{nt} -> {' '.join(rhs)}: only tail recursion is supported")
                        sub_entry, sub_exit = new_state(), new_state()
                        eps[cur].append((sub_entry, ones))
                        build(tok, sub_entry, sub_exit, stack + (tok,))
                        cur = sub_exit
                    else:
                        nxt = new_state()
                        emit[cur].append((nxt, tok, ones))
                        cur = nxt
                if cur is not None:
                    eps[cur].append((exit_, ones))

        final = new_state()
        build(start, 0, final, (start,))
        closures = {}

        def closure(s, active=()):
            # Weighted epsilon paths from s to states that emit (or to the final state).
            if s in closures:
                return closures[s]
            if s in active:
                raise ValueError("the grammar has an epsilon cycle (a loop that derives the empty string)")
            out = {s: ones} if emit[s] or s == final else {}
            for dst, w in eps[s]:
                for t, v in closure(dst, active + (s,)).items():
                    out[t] = out[t] + w * v if t in out else w * v
            closures[s] = out
            return out

        live = [0] + sorted({d for arcs in emit for d, _, _ in arcs})
        index = {s: i for i, s in enumerate(live)}
        self.start = 0
        self.final = np.zeros((len(live), len(self.grid)))  # [S, G] stop weights
        self.arcs = []  # per state: [(dst, symbol, w[G])] for sampling
        self.table = []  # per state: {word: ((dst, weights [G]), ...)} for parsing
        for s in live:
            c = closure(s)
            self.final[index[s]] = c.get(final, 0.0)
            arcs, by_word = [], {}
            for t, ct in c.items():
                for dst, sym, w in emit[t]:
                    arcs.append((index[dst], sym, ct * w))
                    if self.symbol_kind(sym) == "class":
                        words, probs = self.class_words[sym.lstrip("~")], self.emissions[sym] * (ct * w)
                    else:
                        words, probs = [sym], (ct * w)[None]
                    for word, p in zip(words, probs):
                        slot = by_word.setdefault(word, {})
                        slot[index[dst]] = slot[index[dst]] + p if index[dst] in slot else p
            self.arcs.append(arcs)
            self.table.append({w: tuple(d.items()) for w, d in by_word.items()})
        self.vocabulary = sorted({w for t in self.table for w in t})
        # Sampling tables as Python lists (bisect beats numpy on such short rows): per state and
        # grid point the cumulative weights of [stop, arc 1, arc 2, ...] (they sum to 1), and
        # per arc (dst, class name or None, literal word).
        self._option_cdf = [
            np.cumsum(np.concatenate([self.final[i][None]] + [a[2][None] for a in arcs]), 0).T.tolist()
            for i, arcs in enumerate(self.arcs)
        ]
        self._arc_info = [
            [(dst, sym if self.symbol_kind(sym) == "class" else None, sym) for dst, sym, _ in arcs]
            for arcs in self.arcs
        ]
        self._emission_cdf = {k: np.cumsum(v, 0).T.tolist() for k, v in self.emissions.items()}

    # ------------------------------------------------------------------ parsing

    def forward(self, words, *, renormalise_every=8):
        """(alpha {state: [G]} normalised to sum 1, log of the normaliser) after the words;
        (None, -inf) once no derivation fits. The log normaliser is log P(review starts with words).

        Probabilities are rescaled every few words only (a word of this world costs far less
        than a factor 1e-30, so float64 cannot underflow in between): this is the hot loop."""
        alpha, log_norm, table = {self.start: self.prior}, 0.0, self.table
        for i, word in enumerate(words):
            new = {}
            for state, a in alpha.items():
                for dst, weights in table[state].get(word, ()):  # weights [G]
                    contrib = weights * a
                    new[dst] = new[dst] + contrib if dst in new else contrib
            if not new:
                return None, -np.inf
            alpha = new
            if i % renormalise_every == renormalise_every - 1:
                z = float(sum(v.sum() for v in alpha.values()))
                log_norm += np.log(z)
                alpha = {d: v / z for d, v in alpha.items()}
        z = float(sum(v.sum() for v in alpha.values()))
        return {d: v / z for d, v in alpha.items()}, float(log_norm + np.log(z))

    def log_prob_and_prefix(self, words):
        """(log P(words is a whole derivation) or None, log P(a derivation starts with words)
        or None), from one forward pass; sentiment is marginalised in both."""
        alpha, log_norm = self.forward(words)
        if alpha is None:
            return None, None
        total = sum(float((a * self.final[s]).sum()) for s, a in alpha.items())
        return (float(log_norm + np.log(total)) if total > 0.0 else None), float(log_norm)

    def log_prob(self, words):
        return self.log_prob_and_prefix(words)[0]

    def prefix_log_prob(self, words):
        return self.log_prob_and_prefix(words)[1]

    def sentiment_posterior(self, words):
        """P(s = grid[g] | complete derivation of words) [G], or None if underivable."""
        alpha, _ = self.forward(words)
        if alpha is None:
            return None
        joint = sum(a * self.final[s] for s, a in alpha.items())
        return None if joint.sum() <= 0 else joint / joint.sum()

    # ------------------------------------------------------------------ sampling

    def sample_from(self, state, g, rng, *, max_words=400):
        """Words from automaton state `state` under sentiment grid index g, until it stops."""
        uniform = random.Random(int(rng.integers(2**63))).random  # ~10x cheaper per draw than numpy's
        words = []
        while True:
            cdf = self._option_cdf[state][g]
            k = min(bisect.bisect_right(cdf, uniform() * cdf[-1]), len(cdf) - 1)
            if k == 0:
                return words
            state, cls, word = self._arc_info[state][k - 1]
            if cls is not None:
                cdf = self._emission_cdf[cls][g]
                i = min(bisect.bisect_right(cdf, uniform() * cdf[-1]), len(cdf) - 1)
                word = self.class_words[cls.lstrip("~")][i]
            words.append(word)
            if len(words) > max_words:
                raise RuntimeError(f"sample exceeded {max_words} words")

    def sample(self, rng):
        """(words, sentiment) of one derivation: s from the prior, then the automaton."""
        g = int(rng.integers(len(self.grid)))
        return self.sample_from(self.start, g, rng), float(self.grid[g])

    def sample_continuation(self, words, rng):
        """Words continuing a prefix, drawn from P(rest | prefix) (state and s from the posterior)."""
        alpha, _ = self.forward(words)
        if alpha is None:
            raise ValueError(f"{' '.join(words)!r} is not a prefix of any derivation")
        states = list(alpha)
        flat = np.concatenate([alpha[s] for s in states])  # [S * G]
        k = int(rng.choice(len(flat), p=flat / flat.sum()))
        return self.sample_from(states[k // len(self.grid)], k % len(self.grid), rng)


def _rng(seed_or_rng):
    return seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)


class ReviewWorld:
    """The review world for one seed: the seed sets the word frequencies (Zipf-like, in a
    seed-dependent order within each class) and jitters rule weights, so different seeds are
    different worlds; every sampler below is deterministic given (world seed, its own seed)."""

    def __init__(self, seed=0, *, rules=RULES, classes=CLASSES, start="REVIEW", grid=GRID, beta=BETA):
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 7919])
        jittered_rules = {
            nt: [(r[0] * float(np.exp(0.3 * rng.standard_normal())),) + tuple(r[1:]) for r in rs]
            for nt, rs in rules.items()
        }
        jittered_classes = {}
        for name, entries in classes.items():
            ranks = rng.permutation(len(entries))
            jittered_classes[name] = [(w, v, float((r + 2.0) ** -0.6)) for (w, v), r in zip(entries, ranks)]
        self.grammar = Grammar(jittered_rules, jittered_classes, start=start, grid=grid, beta=beta)
        self.vocabulary = self.grammar.vocabulary  # sorted words of the world

    @staticmethod
    def words(text):
        """Whitespace split: the grammar's view of a text (spacing does not matter)."""
        return text.split()

    def sample_review_with_sentiment(self, rng):
        words, sentiment = self.grammar.sample(_rng(rng))
        return " ".join(words), sentiment

    def sample_review(self, rng):
        """One review text; rng is a numpy Generator or an int seed."""
        return self.sample_review_with_sentiment(rng)[0]

    def corpus(self, n, seed):
        """n reviews, deterministic given (world seed, seed)."""
        rng = np.random.default_rng([self.seed, int(seed), 1])
        return [self.sample_review(rng) for _ in range(n)]

    def prompt_of(self, review, rng):
        """The first 2-5 words of a review, stopping before its first '.' (mid-sentence)."""
        words = review.split()
        first_stop = words.index(".")
        return " ".join(words[: int(_rng(rng).integers(2, min(5, first_stop) + 1))])

    def prompts(self, n, seed):
        """n review openings such as 'this film was' or 'i watched the movie and'."""
        rng = np.random.default_rng([self.seed, int(seed), 2])
        return [self.prompt_of(self.sample_review(rng), rng) for _ in range(n)]

    def sample_continuation(self, prompt, rng):
        """A continuation (leading space) drawn from the world given the prompt's words."""
        rest = self.grammar.sample_continuation(self.words(prompt), _rng(rng))
        return " " + " ".join(rest) if rest else ""

    def log_prob(self, text):
        """Exact log P(text) under the world (sentiment marginalised); None if ungrammatical."""
        return self.grammar.log_prob(self.words(text))

    def prefix_log_prob(self, text):
        """log P(a review starts with the text's words); None if no review does."""
        return self.grammar.prefix_log_prob(self.words(text))

    def log_prob_and_prefix(self, text):
        """(log_prob(text), prefix_log_prob(text)) from one parse."""
        return self.grammar.log_prob_and_prefix(self.words(text))

    def is_grammatical(self, text):
        return self.log_prob(text) is not None

    def is_grammatical_prefix(self, text):  # prompts and truncated reviews are prefixes
        return self.prefix_log_prob(text) is not None


# ---------------------------------------------------------------------- files and tokenizer


def train_tokenizer(texts, out_dir, *, vocab_size=512):
    """Byte-level BPE trained on texts, saved as a Hugging Face tokenizer folder.

    EOS = BOS = '<|endoftext|>', pad = '<|pad|>' (a separate token, so masks and EOS never
    clash), a simple '<|role|>\\n{content}\\n' chat template, no special tokens added on
    encode, no clean-up on decode: decode(encode(t)) == t for every text. Returns out_dir,
    loadable with transformers.AutoTokenizer.from_pretrained."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts to train on")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out_dir)
    return out_dir


def write_jsonl(rows, path):
    """One JSON object a line (parent folders created); returns the number of rows."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for count, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise TypeError(f"{path}: row {count - 1} (0-based) must be a dict, got {type(row).__name__}")
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return count


def write_corpus_jsonl(path, n, seed, *, world=None):
    """n reviews as rows {"text": ...} (world defaults to ReviewWorld(seed=0))."""
    world = world or ReviewWorld(0)
    return write_jsonl(({"text": t} for t in world.corpus(n, seed)), path)


def write_prompts_jsonl(path, n, seed, *, world=None):
    """n review openings as rows {"prompt": ...} (the PPO prompt format)."""
    world = world or ReviewWorld(0)
    return write_jsonl(({"prompt": p} for p in world.prompts(n, seed)), path)
