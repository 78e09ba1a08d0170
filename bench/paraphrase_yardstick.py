"""How well the unedited model carries its own facts to CounterFact's paraphrases.

The generalisation score of an edit (``rephrase_acc``: token accuracy of the new object after each
paraphrase) has a natural yardstick in the same model before any edit: the token accuracy of the
*true* object after the same paraphrases, overall and over the facts whose prompt the model already
completes correctly (:func:`mose_kernels.evaluation.metrics.known_fact_generalisation`). An edit
that made the new object as well known as the model knows its own facts would score about that.

    python -m bench.paraphrase_yardstick --n 100 --out bench/results/cpu-paraphrase-yardstick.jsonl

Data: ``counterfact-edit.json`` from ``../shared/data`` (or ``MOSE_SHARED_DATA``), or ``--requests``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.editing_throughput import counterfact_edit_file
from bench.measure import emit_json_line
from mose_kernels.editing import load_requests
from mose_kernels.evaluation.metrics import known_fact_generalisation
from mose_kernels.evaluation.models import DEFAULT_MODEL, load_model


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.paraphrase_yardstick", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="model alias or path (default: %(default)s)")
    p.add_argument("--requests", default=None, help="requests file (default: the shared counterfact-edit.json)")
    p.add_argument("--start", type=int, default=0, help="first record")
    p.add_argument("--n", type=int, default=100, help="number of records")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    path = Path(args.requests) if args.requests else counterfact_edit_file("paraphrase_yardstick")
    if path is None:
        return 2
    requests = load_requests(path)[args.start : args.start + args.n]
    if not requests:
        print(f"paraphrase_yardstick: no records {args.start}:{args.start + args.n} in {path}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    got = known_fact_generalisation(model, tokenizer, requests)
    line = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "model": args.model, "requests_file": path.name,
            "records": [args.start, args.start + len(requests)],
            **got, "seconds": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads()}
    emit_json_line(line, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
