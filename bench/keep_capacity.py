"""Keep-subspace capacity: how much of each earlier edit's keys stays protected once the keep
subspace is full, for the shipped compression (incremental PCA of every kept key) beside the
policy it replaced (drop the directions that entered with the smallest singular value).

Keys are the edited projection's inputs at every prompt and target position of CounterFact
requests, read on the unedited SmolLM2-135M (the editor reads them on the edited model; edits of
three layers move them little), fed one request at a time as the editor does. For each request
the script reports the share of its keys' energy outside the corpus directions that the final edit
directions still hold (1.0: fully protected; the edit's rotation cannot touch it).

    OMP_NUM_THREADS=1 python -m bench.keep_capacity --n 1000 --layer 5 --out keep_capacity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.editing_throughput import counterfact_corpus, counterfact_edit_file
from mose_kernels.editing import load_requests
from mose_kernels.editing.adapters import capture_activations, find_edit_targets
from mose_kernels.editing.keep import KeepSubspace
from mose_kernels.editing.tokens import batch_prompts, encode_prompt_target
from mose_kernels.evaluation.models import load_model


@dataclass
class DropWeakest:
    """The replaced policy: edit directions keep the singular value they entered with; past
    capacity the smallest are dropped."""

    corpus: Tensor
    edits: Tensor
    energy: Tensor
    max_dim: int
    tol: float = 1e-3

    def add(self, keys: Tensor) -> DropWeakest:
        x = keys.double()
        scale = torch.linalg.matrix_norm(x, ord=2)
        basis = torch.cat([self.corpus, self.edits], dim=1)
        for _ in range(2):
            x = x - (x @ basis) @ basis.T
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        new = s > self.tol * scale
        edits = torch.cat([self.edits, vh[new].T], dim=1)
        energy = torch.cat([self.energy, s[new]])
        room = self.max_dim - self.corpus.shape[1]
        if edits.shape[1] > room:
            order = torch.argsort(energy, descending=True)[:room]
            edits, energy = edits[:, order], energy[order]
        return DropWeakest(self.corpus, edits, energy, self.max_dim, self.tol)


def _protected(edits: Tensor, corpus: Tensor, keys: Tensor) -> float:
    """Share of ``keys``' energy outside ``corpus`` that ``edits`` holds."""
    free = keys - (keys @ corpus) @ corpus.T
    total = float(torch.linalg.matrix_norm(free) ** 2)
    return 1.0 if total == 0 else float(torch.linalg.matrix_norm(free @ edits) ** 2) / total


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": round(statistics.mean(values), 4), "p10": round(ordered[len(ordered) // 10], 4),
            "min": round(ordered[0], 4), "share_ge_0.99": round(sum(v >= 0.99 for v in values) / len(values), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.keep_capacity", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="requests fed in order (counterfact-edit records 0..n-1)")
    p.add_argument("--layer", type=int, default=5, help="layer whose down_proj inputs are the keys")
    p.add_argument("--corpus-dirs", type=int, default=64, help="corpus directions (the preset's)")
    p.add_argument("--capacity", type=float, default=0.75, help="keep capacity (fraction of n, the default)")
    p.add_argument("--checkpoints", default="100,200,500,1000", help="sizes at which protection is reported")
    p.add_argument("--out", type=Path, help="JSON file for the results")
    args = p.parse_args(argv)
    data = counterfact_edit_file("keep_capacity")
    if data is None:
        return 2
    model, tok = load_model("smollm2-135m")
    (target,) = find_edit_targets(model, [args.layer])
    requests = load_requests(data)[: args.n]

    start = time.perf_counter()
    with torch.no_grad():
        corpus_keys = []
        texts = counterfact_corpus(data)
        for i in range(0, len(texts), 16):
            ids, mask = batch_prompts(tok, texts[i : i + 16], "cpu")[:2]
            x = capture_activations(model, [target], input_ids=ids, attention_mask=mask)[target.name][0]
            corpus_keys.append(x[mask.bool()].double())
        keys = []
        for r in requests:
            ids = encode_prompt_target(tok, r.prompt, r.target_new).input_ids.unsqueeze(0)
            keys.append(capture_activations(model, [target], input_ids=ids)[target.name][0][0].double())
    n = target.in_features
    pca = KeepSubspace.empty(n, capacity=args.capacity).with_corpus(torch.cat(corpus_keys), args.corpus_dirs)
    drop = DropWeakest(pca.corpus, pca.edits.clone(), torch.zeros(0, dtype=torch.float64), pca.max_dim)
    print(f"keys read in {time.perf_counter() - start:.1f} s; n = {n}, capacity {pca.max_dim} directions, "
          f"{pca.corpus.shape[1]} corpus", flush=True)

    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.n} | {args.n})
    results = {"n": n, "layer": args.layer, "capacity_dims": pca.max_dim, "corpus_dirs": pca.corpus.shape[1],
               "requests": f"counterfact-edit.json[:{args.n}]", "checkpoints": []}
    seconds = {"pca": 0.0, "drop_weakest": 0.0}
    for i, k in enumerate(keys, start=1):
        t0 = time.perf_counter()
        pca = pca.add(k)
        seconds["pca"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        drop = drop.add(k)
        seconds["drop_weakest"] += time.perf_counter() - t0
        if i in checkpoints:
            row = {"edits": i, "edit_dims": pca.edits.shape[1]}
            for name, state in (("pca", pca), ("drop_weakest", drop)):
                shares = [_protected(state.edits, state.corpus, kk) for kk in keys[:i]]
                quarter = max(i // 4, 1)
                row[name] = {"all": _summary(shares), "oldest_quarter": _summary(shares[:quarter]),
                             "newest_quarter": _summary(shares[-quarter:])}
            results["checkpoints"].append(row)
            print(json.dumps(row), flush=True)
    results["seconds_per_add"] = {k: round(v / len(keys), 4) for k, v in seconds.items()}
    print(json.dumps(results["seconds_per_add"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
