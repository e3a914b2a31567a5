"""Score texts or preference pairs with a trained reward model.

  python -m rm.score --workdir W --data FILE --out OUT.jsonl [--batch_size 32] [--max_length N]

W is an RM workdir (Orbax checkpoint, normalisation from it) or an exported Hugging Face
reward folder (`python -m rm.export`). FILE is JSONL/JSON/Parquet:
  - preference rows (prompt/chosen/rejected, chosen/rejected, or conversational): each output
    line has `chosen_score`, `rejected_score` (normalised), `chosen_raw`, `rejected_raw` and
    `probability` = sigmoid((chosen_raw - rejected_raw) / T), T the workdir's fitted temperature
    (calibration.json; 1 for an exported folder or a run without calibration);
  - single responses: `prompt` + `response` (or `completion`), or `text`, or `messages`
    (a conversation): each output line has `score` and `raw`.
Tokenisation is the training one: prompt tokens + response tokens + EOS.
One output line per input row, in order (bad rows are an error: nothing is dropped).

Ensembles: `--workdir A,B,C --objective mean|wco|uwo [--uwo_lambda 1.0]` (or `--workdir W`, W an
ensemble run's workdir, configs/rm.py model.ensemble_size = K: its members) scores with each member
(its own tokenizer and normalisation) and combines the normalised scores (rm/ensemble.py):
pair lines get the combined `chosen_score` / `rejected_score`, the members' `chosen_members` /
`rejected_members` and `probability` (mean of the members' calibrated probabilities);
single-response lines `score` and `members`.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from common import data_io
from common.workdir import write_jsonl
from rm import data as rm_data
from rm.ensemble import OBJECTIVES, combine_scores, expand_workdirs
from rm.model import load_reward_model, score_arrays, training_max_length


def _read_rows(path):
    source = data_io.resolve_sources(path)[0]
    rows, columns = data_io.read_table(source)
    data_io.check_has_rows(source, rows)
    return rows, columns


def _bad(file, index, key, detail, reason="wrong_type", line=None):
    return data_io.BadRowError(file, index, key, reason, detail, line=line)


def tokenize_single(tokenizer, rows, *, file, max_length):
    """Token ids (prompt + response + EOS) of single-response rows, left-truncating prompts."""
    eos, _ = data_io.special_ids(tokenizer)
    seqs, truncated = [], 0
    for i, row in enumerate(rows):
        if isinstance(row, data_io.UnreadableRow):
            raise _bad(file, i, None, row.detail, row.reason, line=row.line)
        if row.get("messages") is not None:
            try:
                msgs = data_io.expect_messages(row, "messages")
            except data_io.RowIssue as issue:
                raise _bad(file, i, issue.key, issue.detail, issue.reason) from None
            prompt = data_io.render_chat(tokenizer, msgs[:-1], add_generation_prompt=True)
            full = data_io.render_chat(tokenizer, msgs, add_generation_prompt=False)
            prompt_ids = data_io.tokenize(tokenizer, [prompt])[0]
            full_ids = data_io.tokenize(tokenizer, [full])[0]
            k = data_io.common_prefix_length(prompt_ids, full_ids)
            prompt_ids, response_ids = full_ids[:k], full_ids[k:]
        elif row.get("response") is not None or row.get("completion") is not None:
            key = "response" if row.get("response") is not None else "completion"
            response = row[key]
            prompt = row.get("prompt") or ""
            if not isinstance(prompt, str):
                raise _bad(file, i, "prompt", f"expected a string, got {data_io.describe(prompt)}")
            # After a non-empty prompt an empty response is EOS alone (scored like a PPO rollout that
            # stopped at once); without a prompt there would be nothing to score.
            if not isinstance(response, str) or not (response.strip() or prompt.strip()):
                raise _bad(
                    file, i, key, f"expected a string (non-empty without a prompt), got {data_io.describe(response)}"
                )
            prompt_ids = data_io.tokenize(tokenizer, [prompt])[0] if prompt else []
            response_ids = data_io.tokenize(tokenizer, [response])[0]
        elif "text" in row:
            text = row["text"]
            if not isinstance(text, str) or not text.strip():
                raise _bad(
                    file,
                    i,
                    "text",
                    f"expected a non-empty string, got {data_io.describe(text)}",
                    "empty" if isinstance(text, str) else "wrong_type",
                )
            prompt_ids, response_ids = [], data_io.tokenize(tokenizer, [text])[0]
        else:
            raise _bad(
                file,
                i,
                None,
                f"expected preference columns (chosen, rejected) or one of 'text', "
                f"'prompt'+'response', 'messages'; got keys {sorted(row)}",
                "missing",
            )
        response_ids = response_ids if response_ids and response_ids[-1] == eos else response_ids + [eos]
        if len(prompt_ids) + len(response_ids) > max_length:
            truncated += 1
            keep = max(max_length - len(response_ids), 0)
            prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep else []
            response_ids = response_ids[:max_length]
        seqs.append(prompt_ids + response_ids)
    return seqs, truncated


def pad_right(seqs, pad_id, width=None):
    width = width or max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def main(argv=None):
    """The command line; a user error (bad file, row or workdir) prints one line and exits 2."""
    from common.run_utils import exit_on_user_error

    with exit_on_user_error("rm.score"):
        _main(argv)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workdir",
        required=True,
        help="RM workdir or exported HF reward folder; several, comma-separated, or an ensemble run's workdir, "
        "score as an ensemble",
    )
    ap.add_argument("--data", required=True, help="JSONL/JSON/Parquet file to score")
    ap.add_argument("--out", required=True, help="output JSONL, one line per input row")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=None, help="default: the training run's data.max_length")
    ap.add_argument(
        "--objective",
        default="mean",
        choices=OBJECTIVES,
        help="ensemble objective over the members' normalised scores (several --workdir): mean | wco "
        "(min over members) | uwo (mean - uwo_lambda * variance)",
    )
    ap.add_argument("--uwo_lambda", type=float, default=1.0, help="variance weight of --objective uwo")
    args = ap.parse_args(argv)

    # An ensemble run's workdir (model.ensemble_size = K) stands for its K member workdirs.
    workdirs = expand_workdirs([args.workdir] if os.path.exists(args.workdir) else args.workdir)
    if len(workdirs) > 1:
        members = [_score_with(w, args) for w in workdirs]
        records = ensemble_records([m[0] for m in members], objective=args.objective, uwo_lambda=args.uwo_lambda)
        write_jsonl(args.out, records)
        print(
            f"scored {len(records)} rows with a {len(workdirs)}-member ensemble ({args.objective}) -> {args.out} "
            f"(truncated: {[m[1] for m in members]})",
            file=sys.stderr,
        )
        return
    records, truncated, model = _score_with(workdirs[0], args)
    write_jsonl(args.out, records)
    print(
        f"scored {len(records)} rows -> {args.out} (truncated: {truncated}; normalisation gain={model.gain:.6g}, "
        f"bias={model.bias:.6g}; temperature={model.temperature:.6g})",
        file=sys.stderr,
    )


def ensemble_records(member_records, *, objective, uwo_lambda=1.0):
    """Output lines of an ensemble from each member's lines (same rows, same order).

    Pairs: chosen_score / rejected_score = the objective over the members' normalised scores,
    chosen_members / rejected_members the members' normalised scores, probability the mean of
    the members' calibrated probabilities. Single responses: score and members."""
    first = member_records[0]
    counts = [len(m) for m in member_records]
    if len(set(counts)) != 1:
        raise ValueError(
            f"ensemble members scored different numbers of rows {counts} (pairs that one member's "
            f"tokenizer truncates to identical texts are dropped); use members with one tokenizer"
        )
    if "chosen_score" in first[0]:
        chosen = np.array([[r["chosen_score"] for r in m] for m in member_records])  # [K, N]
        rejected = np.array([[r["rejected_score"] for r in m] for m in member_records])  # [K, N]
        probability = np.array([[r["probability"] for r in m] for m in member_records]).mean(0)  # [N]
        chosen_score = combine_scores(chosen, objective=objective, uwo_lambda=uwo_lambda)
        rejected_score = combine_scores(rejected, objective=objective, uwo_lambda=uwo_lambda)
        return [
            {
                "chosen_score": float(chosen_score[i]),
                "rejected_score": float(rejected_score[i]),
                "chosen_members": chosen[:, i].tolist(),
                "rejected_members": rejected[:, i].tolist(),
                "probability": float(probability[i]),
            }
            for i in range(chosen.shape[1])
        ]
    scores = np.array([[r["score"] for r in m] for m in member_records])  # [K, N]
    combined = combine_scores(scores, objective=objective, uwo_lambda=uwo_lambda)
    return [{"score": float(combined[i]), "members": scores[:, i].tolist()} for i in range(scores.shape[1])]


def _score_with(workdir, args):
    """(records, truncated count, model) of one reward model on the rows of args.data."""
    model = load_reward_model(workdir)
    tokenizer = data_io.load_tokenizer(model.tokenizer_path or workdir)
    max_length = args.max_length or training_max_length(workdir)
    rows, columns = _read_rows(args.data)
    columns = set(columns)
    records = []
    if {"chosen", "rejected"} <= columns:
        pairs = rm_data.load_preference_data(args.data, tokenizer, max_length=max_length, on_bad_row="error")
        chosen = score_arrays(model, pairs.chosen_ids, pairs.chosen_mask, batch_size=args.batch_size)
        rejected = score_arrays(model, pairs.rejected_ids, pairs.rejected_mask, batch_size=args.batch_size)
        for c, r in zip(chosen, rejected):
            records.append(
                {
                    "chosen_score": float(model.normalize(c)),
                    "rejected_score": float(model.normalize(r)),
                    "chosen_raw": float(c),
                    "rejected_raw": float(r),
                    "probability": float(model.preference_probability(c, r)),
                }
            )
        truncated = pairs.stats.get("truncated_prompt", 0) + pairs.stats.get("truncated_response", 0)
    else:
        seqs, truncated = tokenize_single(tokenizer, rows, file=args.data, max_length=max_length)
        _, pad = data_io.special_ids(tokenizer)
        ids, mask = pad_right(seqs, pad)
        raw = score_arrays(model, ids, mask, batch_size=args.batch_size)
        records = [{"score": float(model.normalize(r)), "raw": float(r)} for r in raw]
    raws = [r.get("raw", r.get("chosen_raw")) for r in records] + [
        r["rejected_raw"] for r in records if "rejected_raw" in r
    ]
    if len(raws) > 1 and len(set(raws)) == 1:
        print(
            f"rm.score: warning ({workdir}): all {len(raws)} scores are the same ({raws[0]:.6g}): the model or "
            "its tokenizer is probably broken (e.g. an empty tokenizer or an untrained head)",
            file=sys.stderr,
        )
    return records, truncated, model


if __name__ == "__main__":
    main()
