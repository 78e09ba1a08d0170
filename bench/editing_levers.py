"""Lever study of the MOSE editing engine: one ``EditConfig`` variant, sequential CounterFact edits
on SmolLM2-135M (CPU), EasyEdit token-level efficacy / generalisation / locality right after each
edit and after all of them, seconds per edit and the stability of every edited layer.

Each run appends one JSON line to ``--out``; the variants compared in the issue notes were run as
``OMP_NUM_THREADS=1 python -m bench.editing_levers --n 30 --config '<json>' --out levers.jsonl``.

Data: ``counterfact-edit.json`` from ``../shared/data`` (or ``MOSE_SHARED_DATA``); the keep
corpus is the ``prompt + ground_truth`` of records ``--corpus-records`` (default 2000:2300,
disjoint from the edited records). Scores (token level, teacher-forced, as in EasyEdit): rewrite
accuracy on the prompt, rephrase accuracy averaged over the paraphrases, locality = agreement of
the argmax tokens on the first neighbourhood prompt with the unedited model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from bench.editing_throughput import counterfact_corpus, counterfact_edit_file
from bench.measure import emit_json_line
from mose_kernels.editing import MoseEditor, load_requests
from mose_kernels.editing.config import keep_corpus_label
from mose_kernels.editing.tokens import batch_prompt_targets
from mose_kernels.evaluation.models import load_model


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.editing_levers", description=__doc__.splitlines()[0])
    p.add_argument("--start", type=int, default=0, help="first edited record")
    p.add_argument("--n", type=int, default=100, help="number of sequential edits")
    p.add_argument("--config", default="{}", help="JSON object of EditConfig fields over the SmolLM2 preset")
    p.add_argument("--corpus-records", default="2000:2300",
                   help="records A:B of the keep corpus ('' = EditConfig's default, the shipped keep_corpus.txt)")
    p.add_argument("--out", type=Path, help="JSON-lines file the summary is appended to")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    data = counterfact_edit_file("editing_levers")
    if data is None:
        return 2
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    requests = load_requests(data)[args.start : args.start + args.n]
    config = json.loads(args.config)
    if args.corpus_records:
        a, b = (int(x) for x in args.corpus_records.split(":"))
        config.setdefault("keep_corpus", counterfact_corpus(data, a, b))

    @torch.no_grad()
    def predictions(pairs):
        out = []
        for i in range(0, len(pairs), 32):
            ids, mask, labels = batch_prompt_targets(tok, pairs[i : i + 32])
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            lab = labels[:, 1:]
            out += [(pred[r][lab[r] != -100], lab[r][lab[r] != -100]) for r in range(ids.shape[0])]
        return out

    def accuracy(pairs):
        return [float((p == t).float().mean()) for p, t in predictions(pairs)]

    loc_pairs = [(r.locality_prompts[0], r.locality_answers[0]) for r in requests]
    loc_base = [p for p, _ in predictions(loc_pairs)]

    def locality(idx):
        after = predictions([loc_pairs[i] for i in idx])
        return [float((p == loc_base[i]).float().mean()) for i, (p, _) in zip(idx, after, strict=True)]

    def scores(i, r):
        rephrase = statistics.mean(accuracy([(q, r.target_new) for q in r.rephrase_prompts]))
        return accuracy([(r.prompt, r.target_new)])[0], rephrase, locality([i])[0]

    editor = MoseEditor(model, tok, config)
    seconds, right_after = [], []
    for i, request in enumerate(requests):
        result = editor.edit(request)[0]
        seconds.append(result.seconds)
        right_after.append(scores(i, request))
        if i % 10 == 9 or i == len(requests) - 1:
            print(f"{i + 1} edits; last: {result.steps} steps, loss {result.final_loss:.3f}, keep dims "
                  f"{result.extra.get('keep_dims')}", flush=True)
    after_all = [scores(i, r) for i, r in enumerate(requests)]
    summary = {
        "config": {k: v for k, v in config.items() if k != "keep_corpus"},
        "start": args.start, "n": args.n, "corpus_records": args.corpus_records,
        "keep_corpus": (f"counterfact-edit records {args.corpus_records}" if args.corpus_records
                        else keep_corpus_label(config.get("keep_corpus"))),
        "right_after": [round(statistics.mean(s[j] for s in right_after), 3) for j in range(3)],
        "after_all": [round(statistics.mean(s[j] for s in after_all), 3) for j in range(3)],
        "median_s": round(statistics.median(seconds), 3), "mean_s": round(statistics.mean(seconds), 3),
        "torch_threads": torch.get_num_threads(),
        "stability": editor.stability(),
    }
    emit_json_line(summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
