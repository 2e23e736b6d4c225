"""A seeded chat dataset whose lengths spread as real fine-tuning data does, for speed measurements.

Each record is {"messages": [...]} (an optional system turn, 1-3 user/assistant exchanges) of English-like
sentences. The conversation's length in tokens is drawn from a log-normal distribution (median
``--median`` tokens, log-space sigma ``--sigma``; with the defaults about 1.3% of the records exceed
2,048 tokens); a quarter of it goes to the prompts, the rest to the answers. Tokens are estimated as
1.3 per word (common English words under a ~32k-128k BPE vocabulary); ``--tokenizer DIR`` measures them
with a real tokenizer and prints the spread.

    python tools/make_chat_dataset.py --out chat.jsonl --records 2000 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random

TOKENS_PER_WORD = 1.3
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but "
         "they you were their one all we can there has more when will would what so if out about up into them "
         "some could time these two may then do first any my now such like our over man me even most made after "
         "also did many before must through back years where much your way well down should because each just "
         "those people how too little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old year off come since "
         "against go came right used take three model data train step loss answer question explain example "
         "function value result memory speed token batch layer kernel python code file error number list").split()
SYSTEM = ["You are a helpful assistant.", "You are a concise assistant; answer briefly.",
          "You are an expert programmer who explains code step by step."]


def sentence_words(rng: random.Random, words: int) -> str:
    """About ``words`` words as sentences of 6-20 words, capitalised and punctuated."""
    out, left = [], max(1, words)
    while left > 0:
        n = min(left, rng.randint(6, 20))
        s = " ".join(rng.choice(WORDS) for _ in range(n))
        out.append(s[0].upper() + s[1:] + rng.choice(".....?!"))
        left -= n
    return " ".join(out)


def make_record(rng: random.Random, median: float, sigma: float) -> dict:
    tokens = math.exp(rng.gauss(math.log(median), sigma))
    words = max(8, round(tokens / TOKENS_PER_WORD))
    exchanges = rng.choice([1, 1, 1, 2, 3])
    messages = [{"role": "system", "content": rng.choice(SYSTEM)}] if rng.random() < 0.3 else []
    for _ in range(exchanges):
        share = words / exchanges
        messages.append({"role": "user", "content": sentence_words(rng, round(0.25 * share))})
        messages.append({"role": "assistant", "content": sentence_words(rng, round(0.75 * share))})
    return {"messages": messages}


def make_dataset(records: int, seed: int = 0, median: float = 350, sigma: float = 0.8) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(rng, median, sigma) for _ in range(records)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--median", type=float, default=350, help="median conversation length in tokens")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-space spread of the lengths")
    parser.add_argument("--tokenizer", help="a local tokenizer directory to measure the lengths with")
    args = parser.parse_args(argv)
    data = make_dataset(args.records, args.seed, args.median, args.sigma)
    tmp = f"{args.out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in data)
    os.replace(tmp, args.out)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer)
        lengths = sorted(len(tok(" ".join(m["content"] for m in r["messages"]))["input_ids"]) for r in data)
        label = "tokens"
    else:
        lengths = sorted(round(TOKENS_PER_WORD * sum(len(m["content"].split()) for m in r["messages"])) for r in data)
        label = "tokens (estimated)"
    n = len(lengths)
    print(f"{n} records to {args.out}; {label}: median {lengths[n // 2]}, p90 {lengths[int(0.9 * n)]}, "
          f"max {lengths[-1]}, over 2048: {sum(x > 2048 for x in lengths)}")


if __name__ == "__main__":
    main()
