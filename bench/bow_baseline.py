"""Bag-of-words baseline: how many test pairs do word statistics alone rank right?

A reward model's accuracy means little without the floors beside it: "the longer response wins"
(rmkit eval prints it) and this one, a linear model on TF-IDF words. Features of a pair are
tfidf(better) - tfidf(worse); a logistic regression without intercept is trained on both x
(label 1) and -x (label 0), so swapping a pair flips its score exactly and the model cannot
learn "the first one wins". A test pair is right when w . (tfidf(better) - tfidf(worse)) > 0 (an
exact tie, e.g. identical texts, counts as wrong, as in `rmkit eval`). The vocabulary and IDF
come from the training responses only. The interval is the same prompt-clustered bootstrap as
`rmkit eval` (rmkit.stats), on the same resamples as the length baseline beside it.

    rmkit data convert ../shared/data/dsp.json --domain business -o /tmp/bow/business.jsonl
    rmkit data split /tmp/bow/business.jsonl --test 0.2 -o /tmp/bow/business
    python bench/bow_baseline.py --train /tmp/bow/business/train.jsonl --test /tmp/bow/business/test.jsonl
    python bench/bow_baseline.py ... --last-tokens 64 --tokenizer runs/results/runs/grft/final

`--last-tokens N` cuts every response to its last N tokens first: about what a reward model trained
at max_length N sees of it (rows are cut from the left), so the baseline can be read at the model's
own window as well as on whole texts.

Needs scikit-learn (`pip install -e .[bench]`). As a function: `bow_accuracy(train, test)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rmkit.data.records import Record, read_records
from rmkit.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, cluster_ids, clustered_bootstrap


def pair_texts(records: list[Record]) -> tuple[list[str], list[str], list[str]]:
    """(better, worse, prompt) of every pair, in `Record.pairs()` order."""
    better, worse, prompts = [], [], []
    for rec in records:
        for i, j in rec.pairs():
            better.append(rec.responses[i])
            worse.append(rec.responses[j])
            prompts.append(rec.prompt)
    return better, worse, prompts


def last_tokens(records: list[Record], tokenizer: Any, n: int) -> list[Record]:
    """Every response cut to its last n tokens (the end a left-truncated row keeps); shorter ones
    are unchanged."""
    out = []
    for rec in records:
        cut = []
        for text in rec.responses:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut.append(text if len(ids) <= n else tokenizer.decode(ids[-n:]))
        out.append(dataclasses.replace(rec, responses=tuple(cut)))
    return out


def bow_accuracy(train_records: list[Record], test_records: list[Record], *, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED, c: float = 1.0, ngrams: int = 1) -> dict[str, Any]:
    """Train on train_records' pairs, score test_records' pairs; accuracy and the length baseline
    with prompt-clustered bootstrap intervals, and their paired difference (all fractions)."""
    from scipy.sparse import vstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    tb, tw, _ = pair_texts(train_records)
    eb, ew, prompts = pair_texts(test_records)
    if not tb or not eb:
        raise ValueError(f"need pairs on both sides: {len(tb)} train, {len(eb)} test")
    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, ngrams))
    vec.fit(tb + tw)
    x = vec.transform(tb) - vec.transform(tw)
    clf = LogisticRegression(C=c, fit_intercept=False, max_iter=5000)
    clf.fit(vstack([x, -x]), np.r_[np.ones(x.shape[0]), np.zeros(x.shape[0])])
    margin = (vec.transform(eb) - vec.transform(ew)) @ clf.coef_[0]
    right = np.asarray(margin).ravel() > 0
    longer = np.array([len(b) > len(w) for b, w in zip(eb, ew)])
    boot = clustered_bootstrap(cluster_ids(prompts), np.stack([longer, right], axis=1), n_resamples, seed)
    length, bow = boot.accuracy
    return {"accuracy": bow.value, "ci": [bow.lo, bow.hi],
            "length_baseline": length.value, "length_ci": [length.lo, length.hi],
            "bow_minus_length": boot.diff[1].as_dict(),  # on the same resamples
            "pairs": boot.pairs, "prompts": boot.clusters, "train_pairs": len(tb),
            "train_prompts": len(set(r.prompt for r in train_records)), "vocabulary": len(vec.vocabulary_),
            "bootstrap": {"unit": "prompt", "resamples": n_resamples, "seed": seed, "level": boot.level,
                          "interval": "percentile"},
            "model": {"features": f"tfidf(better) - tfidf(worse), sublinear tf, {ngrams}-grams",
                      "classifier": f"LogisticRegression(C={c}, fit_intercept=False), trained on x and -x"}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True, help="canonical JSONL (rmkit data convert / split)")
    ap.add_argument("--test", type=Path, required=True, help="canonical JSONL scored with the trained model")
    ap.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, help="resamples of prompts")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--ngrams", type=int, default=1, help="1: words; 2: words and word pairs")
    ap.add_argument("--last-tokens", type=int, help="cut every response to its last N tokens first")
    ap.add_argument("--tokenizer", type=Path, help="the tokenizer folder for --last-tokens (e.g. a checkpoint)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if (args.last_tokens is None) != (args.tokenizer is None):
        ap.error("--last-tokens and --tokenizer go together")
    train, test = read_records(args.train), read_records(args.test)
    if args.last_tokens is not None:
        from rmkit.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        train, test = last_tokens(train, tok, args.last_tokens), last_tokens(test, tok, args.last_tokens)
        print(f"responses cut to their last {args.last_tokens} tokens ({args.tokenizer})")
    shared = {r.prompt for r in train} & {r.prompt for r in test}
    if shared:
        print(f"warning: {len(shared)} prompts are on both sides; split with `rmkit data split`", file=sys.stderr)
    res = bow_accuracy(train, test, n_resamples=args.bootstrap, seed=args.seed, c=args.c, ngrams=args.ngrams)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    d = res["bow_minus_length"]
    print(f"bag-of-words: {pct(res['accuracy'])}% [{pct(res['ci'][0])}, {pct(res['ci'][1])}] of {res['pairs']} "
          f"test pairs ({res['prompts']} prompts); trained on {res['train_pairs']} pairs "
          f"({res['train_prompts']} prompts), vocabulary {res['vocabulary']}")
    print(f"length baseline: {pct(res['length_baseline'])}% [{pct(res['length_ci'][0])}, {pct(res['length_ci'][1])}]; "
          f"bag-of-words - length: {100 * d['value']:+.1f} points [{pct(d['lo'])}, {pct(d['hi'])}]")
    print(f"95% percentile intervals, {args.bootstrap} bootstrap resamples of prompts, seed {args.seed}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
