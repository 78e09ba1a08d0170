"""End-to-end editing throughput: seconds per edit and peak memory of each solver of
:class:`mose_kernels.editing.MoseEditor`, beside the authors' approach (:mod:`bench.authors_cayley`),
on the same requests, with efficacy (target-token accuracy) right after each edit and after all.

Models: ``smollm2-135m`` (the real SmolLM2-135M shipped as GGUF, CPU), ``llama3-8b-random`` (the
LLaMA-3-8B architecture built from its config with random bf16 weights, for a GPU: time and memory
only, efficacy on random weights means nothing) and ``tiny-llama`` (a small random LLaMA, for CI).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import measure
from mose_kernels.editing import EditRequest, encode_prompt_target, load_requests, num_layers

logger = logging.getLogger(__name__)

SOLVERS = ("gradient", "procrustes")
_FALLBACK_FACTS = [
    ("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    ("Toyota is headquartered in", "Toyota", "Berlin", "Japan"),
    ("The capital of Norway is", "Norway", "Lisbon", "Oslo"),
    ("Lionel Messi plays the sport of", "Lionel Messi", "cricket", "football"),
    ("The Louvre is in the city of", "The Louvre", "Madrid", "Paris"),
    ("Apple was founded by", "Apple", "Bill Gates", "Steve Jobs"),
    ("The Nile flows through", "The Nile", "Canada", "Egypt"),
]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout, or ``MOSE_SHARED_DATA``, if it exists."""
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    path = Path(os.environ.get("MOSE_SHARED_DATA", default))
    return path if path.is_dir() else None


def counterfact_edit_file(prog: str) -> Path | None:
    """``counterfact-edit.json`` of the shared data, or ``None`` after telling why on stderr."""
    folder = shared_data_dir()
    if folder is None or not (folder / "counterfact-edit.json").is_file():
        print(f"{prog}: needs counterfact-edit.json in ../shared/data or $MOSE_SHARED_DATA", file=sys.stderr)
        return None
    return folder / "counterfact-edit.json"


def counterfact_corpus(data: Path, start: int = 2000, stop: int = 2300) -> list[str]:
    """``prompt + ground_truth`` of records ``start:stop`` of a flat CounterFact file: the keep
    corpus of the SmolLM2 studies (disjoint from the edited records)."""
    return [f"{r['prompt']} {r['ground_truth']}" for r in json.loads(data.read_text())[start:stop]]


def edit_requests(count: int) -> tuple[list[EditRequest], str]:
    """``count`` CounterFact requests from counterfact-val (held out), else built-in facts."""
    folder = shared_data_dir()
    if folder is not None and (folder / "counterfact-val.json").is_file():
        return load_requests(folder / "counterfact-val.json", limit=count), f"counterfact-val.json[:{count}]"
    facts = (_FALLBACK_FACTS * (count // len(_FALLBACK_FACTS) + 1))[:count]
    requests = [EditRequest(prompt=p, subject=s, target_new=t, ground_truth=g) for p, s, t, g in facts]
    return requests, "built-in facts (shared data not found)"


def byte_bpe_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained in memory on the fallback facts (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(f) for f in _FALLBACK_FACTS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def load_bench_model(name: str, device: torch.device):
    """``(model, tokenizer, dtype)`` for a model name of this module's docstring."""
    if name == "smollm2-135m":
        from mose_kernels.evaluation.models import load_model

        model, tok = load_model("smollm2-135m", dtype=torch.float32, device=device)
        return model, tok, torch.float32
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_bpe_tokenizer()
    if name == "llama3-8b-random":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
        dtype = torch.bfloat16
    elif name == "tiny-llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128)
        dtype = torch.float32
    else:
        raise ValueError(f"unknown editing model {name!r}; expected smollm2-135m, llama3-8b-random or tiny-llama")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), tok, dtype


@torch.no_grad()
def target_token_accuracy(model, tokenizer, request: EditRequest) -> float:
    """Fraction of target tokens that are the argmax under teacher forcing (EasyEdit's efficacy)."""
    device = next(model.parameters()).device
    pt = encode_prompt_target(tokenizer, request.prompt, request.target_new)
    logits = model(input_ids=pt.input_ids.unsqueeze(0).to(device)).logits[0]
    pred = logits[pt.prompt_length - 1 : -1].argmax(-1)
    return (pred == pt.target_ids.to(device)).float().mean().item()


def _peak_during(fn: Callable[[], object], device: torch.device) -> tuple[object, int | None]:
    out: list = []
    peak = measure.peak_extra_memory(lambda: out.append(fn()), device)
    return out[0], peak


def _sequential_run(edit_one: Callable[[EditRequest], dict], model, tok, requests: list[EditRequest],
                    device: torch.device, eval_efficacy: bool) -> dict:
    """Edit the requests one after another; time each edit, efficacy after each and after all."""
    per_edit, post, peaks = [], [], []
    for request in requests:
        start = time.perf_counter()
        info, peak = _peak_during(lambda request=request: edit_one(request), device)
        per_edit.append(time.perf_counter() - start)
        peaks.append(peak)
        if eval_efficacy:
            post.append(target_token_accuracy(model, tok, request))
    final = [target_token_accuracy(model, tok, r) for r in requests] if eval_efficacy else []
    known = [p for p in peaks if p is not None]
    steady = [p for p in peaks[1:] if p is not None]
    return {
        "seconds_per_edit": sum(per_edit) / len(per_edit),
        "seconds_per_edit_median": sorted(per_edit)[len(per_edit) // 2],
        # the first edit of an editor includes one-off set-up (e.g. corpus statistics)
        "first_edit_s": per_edit[0],
        "seconds_per_edit_steady": sum(per_edit[1:]) / (len(per_edit) - 1) if len(per_edit) > 1 else None,
        "seconds": per_edit,
        "peak_extra_bytes": max(known) if known else None,
        "peak_extra_bytes_steady": max(steady) if steady else None,
        "efficacy_post_edit": sum(post) / len(post) if post else None,
        "efficacy_after_all": sum(final) / len(final) if final else None,
        "last": info,
    }


def run_ours(model, tok, requests, solver: str, device: torch.device, eval_efficacy: bool, layers=None) -> dict:
    """Our editor with one solver; the model is edited in place."""
    from mose_kernels.editing import MoseEditor

    config = {"solver": solver}
    if layers is not None:
        config["layers"] = list(layers)
    editor = MoseEditor(model, tok, config)
    chosen_layers = list(editor.config.layers)

    def edit_one(request: EditRequest) -> dict:
        (result,) = editor.edit([request], sequential_edit=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"steps": result.steps, "success": result.success, "final_loss": result.final_loss}

    row = _sequential_run(edit_one, model, tok, requests, device, eval_efficacy)
    row.update(method=f"mose:{solver}", layers=chosen_layers, config=editor.config.to_dict())
    return row


def run_authors(model, tok, requests, layers, device: torch.device, eval_efficacy: bool) -> dict:
    """The authors' approach on the same layers (the model is wrapped, then unwrapped)."""
    from bench.authors_cayley import LR, STEPS, AuthorsCayleyEditor

    editor = AuthorsCayleyEditor(model, tok, layers)
    try:
        def edit_one(request: EditRequest) -> dict:
            result = editor.edit(request)
            return {"steps": result.steps, "final_loss": result.final_loss}

        row = _sequential_run(edit_one, model, tok, requests, device, eval_efficacy)
    finally:
        editor.remove()
    row.update(method="authors_cayley", layers=list(layers), config={"steps": STEPS, "lr": LR, "blocks": 4})
    return row


def default_layers(model) -> list[int]:
    """Three layers around 60 % depth (the authors edit 19-21 of LLaMA-3-8B's 32), used for their
    approach only when our editor did not run to choose them."""
    total = num_layers(model)
    centre = min(max(1, round(0.6 * total)), total - 2)
    return [centre - 1, centre, centre + 1]


@torch.no_grad()
def _restore(model, pristine: dict) -> None:
    """Put the unedited weights back (every method starts from the same model)."""
    for name, tensor in model.state_dict().items():
        if name in pristine:
            tensor.copy_(pristine[name])


def run(*, device: torch.device, model: str | None = None, edits: int | None = None, quick: bool = False,
        log: Callable[[str], None] = print) -> dict:
    """Every solver of ours and the authors' approach on ``edits`` sequential edits each, every method
    starting from the same unedited weights."""
    name = model or ("tiny-llama" if quick else ("llama3-8b-random" if device.type == "cuda" else "smollm2-135m"))
    count = edits or (2 if quick else 5)
    base, tok, dtype = load_bench_model(name, device)
    requests, source = edit_requests(count)
    eval_efficacy = name != "llama3-8b-random"
    doc = {"model": name, "dtype": str(dtype).replace("torch.", ""), "requests": source, "edits": count,
           "memory_method": measure.CUDA_MEMORY_METHOD if device.type == "cuda" else measure.CPU_MEMORY_METHOD,
           "efficacy": "target-token argmax accuracy (teacher forcing), right after each edit and after all"
                       if eval_efficacy else "not measured (random weights)", "rows": []}
    pristine = {k: v.detach().clone() for k, v in base.state_dict().items()}
    layers = None
    for method in (*SOLVERS, "authors_cayley"):
        _restore(base, pristine)
        model_ = base
        try:
            if method == "authors_cayley":
                row = run_authors(model_, tok, requests, layers or default_layers(model_), device, eval_efficacy)
            else:
                row = run_ours(model_, tok, requests, method, device, eval_efficacy)
                layers = layers or row["layers"]
            row["status"] = "ok"
        except (ImportError, AttributeError, RuntimeError, ValueError, TypeError) as exc:
            logger.warning("editing throughput: %s failed: %s", method, exc)
            row = {"method": method if method == "authors_cayley" else f"mose:{method}", "status": "error",
                   "reason": f"{type(exc).__name__}: {exc}"[:300]}
        doc["rows"].append(row)
        log(format_editing_row(row))
    return doc


def format_editing_row(row: dict) -> str:
    if row["status"] != "ok":
        return f"edit {row['method']:<16} {row['status']}: {row.get('reason', '')}"
    mem = row.get("peak_extra_bytes")
    eff = row.get("efficacy_post_edit")
    fin = row.get("efficacy_after_all")
    eff_text = "" if eff is None else f"  efficacy {eff:.2f} post-edit, {fin:.2f} after all"
    return (f"edit {row['method']:<16} {row['seconds_per_edit']:8.3f} s/edit  "
            f"peak {'n/a' if mem is None else f'{mem / 2**20:.0f} MiB'}{eff_text}")
