"""The ``mose`` command line: ``demo``, ``edit``, ``eval``, ``undo`` and ``replay``.

User errors (a missing file, an unknown model, a malformed request file, bad settings) print one
line ``mose: error: ...`` and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_REQUESTS = DATA_DIR / "demo_requests.json"
PROBE_FACTS = DATA_DIR / "probe_facts.json"
PERPLEXITY_TEXT = DATA_DIR / "perplexity.txt"
EXIT_USAGE = 2

logger = logging.getLogger("mose_kernels.cli")


class CliError(Exception):
    """A user error: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------- helpers
def _existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise CliError(f"{what} not found: {p}")
    return p


def _load_requests(path: str, fmt: str, limit: int | None):
    from mose_kernels.editing.requests import load_requests

    p = _existing_file(path, "request file")
    if p.is_dir():
        raise CliError(f"request file {p} is a folder; pass a JSON file")
    requests = load_requests(p, format=fmt, limit=limit)
    if not requests:
        raise CliError(f"request file {p} holds no edit requests")
    return requests


def _load_model(name: str):
    from mose_kernels.evaluation.models import load_model

    print(f"loading model {name} ...", file=sys.stderr, flush=True)
    return load_model(name)


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise CliError(f"--layers must be comma-separated integers, got {text!r}") from exc


def _edit_config(model, args: argparse.Namespace):
    """The preset for ``model``, overridden by ``--config FILE`` then by the single flags."""
    from mose_kernels.editing.config import EditConfig, preset_for

    values = preset_for(model).to_dict()
    if getattr(args, "config", None):
        path = _existing_file(args.config, "config file")
        try:
            overrides = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CliError(f"config file {path} is not valid JSON ({exc})") from exc
        if not isinstance(overrides, dict):
            raise CliError(f"config file {path} must hold a JSON object of EditConfig fields")
        overrides.pop("notes", None)
        values.update(overrides)
    for flag in ("solver", "side", "steps", "num_reflections"):
        value = getattr(args, flag, None)
        if value is not None:
            values[flag] = value
    layers = _parse_layers(getattr(args, "layers", None))
    if layers is not None:
        values["layers"] = layers
    return EditConfig.from_dict(values)


def _probes() -> list[tuple[str, str]]:
    records = json.loads(PROBE_FACTS.read_text())
    return [(r["prompt"], r["answer"]) for r in records]


def _methods(baseline: str) -> list[str]:
    from mose_kernels.evaluation.protocols import METHODS

    names = [b.strip() for b in baseline.split(",") if b.strip()]
    if names == ["none"]:
        return ["mose"]
    if names == ["all"]:
        return list(METHODS)
    bad = [n for n in names if n not in METHODS[1:]]
    if bad or not names:
        raise CliError(f"--baseline must be none, all or a comma list of {', '.join(METHODS[1:])}; got {baseline!r}")
    return ["mose", *dict.fromkeys(names)]


def _method_list(text: str) -> list[str]:
    from mose_kernels.evaluation.protocols import METHODS

    names = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names or any(n not in METHODS for n in names):
        raise CliError(f"--methods must be a comma list of {', '.join(METHODS)}; got {text!r}")
    return names


def _protocols(protocol: str) -> list[str]:
    return ["after-each", "after-all"] if protocol == "both" else [protocol]


def _save_model(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _print_summary(study: dict[str, Any]) -> None:
    from mose_kernels.evaluation.report import _label

    for key, name in (("after_each", "after-each"), ("after_all", "after-all")):
        rows = [(m, r[key]["summary"]) for m, r in study["methods"].items() if key in r]
        if not rows:
            continue
        print(f"\nprotocol {name}: efficacy / generalisation / locality (token level), ES / NS (CounterFact)")
        for method, s in rows:
            vals = [s.get(k) for k in ("rewrite_acc", "rephrase_acc", "locality_acc", "efficacy_success",
                                       "neighborhood_success")]
            text = " / ".join("-" if v is None else f"{v:.3f}" for v in vals)
            print(f"  {_label(method):<28} {text}")


def _study_job(model_name: str, requests: list[dict[str, Any]], method: str, config: dict[str, Any],
               threads: int, options: dict[str, Any]) -> dict[str, Any]:
    """One method's study in a worker process (see :func:`_run_study`): its own model copy and threads."""
    import torch

    from mose_kernels.editing.config import EditConfig
    from mose_kernels.editing.requests import EditRequest
    from mose_kernels.evaluation.models import load_model
    from mose_kernels.evaluation.protocols import run_study

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    return run_study(model, tokenizer, [EditRequest.from_dict(r) for r in requests], methods=[method],
                     config=EditConfig.from_dict(config), **options)


def _run_study(args: argparse.Namespace, model, tokenizer, requests, methods, protocols, *, title: str,
               generations: int, max_new_tokens: int, curve_points: int, command: str,
               jobs: int = 1) -> dict[str, Path]:
    """Run the study and write its report. ``jobs > 1``: one process per method (each loads its own
    copy of the model and uses ``threads / jobs`` torch threads), results merged into one report."""
    from mose_kernels.evaluation.protocols import run_study
    from mose_kernels.evaluation.report import merge_studies, write_report

    config = _edit_config(model, args)
    out = Path(args.out)
    jobs = max(1, min(jobs, len(methods)))
    threads = _threads() if jobs == 1 else max(1, (args.threads or os.cpu_count() or 1) // jobs)
    header = {
        "command": f"`{command}`",
        "model": args.model,
        "requests": str(getattr(args, "requests", None) or DEMO_REQUESTS.name),
        "methods": ", ".join(methods),
        "machine": f"{platform.machine()} CPU, torch threads {threads}"
                   + (f" in each of {jobs} processes (one per method)" if jobs > 1 else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    started = time.perf_counter()
    options = {"protocols": protocols, "probes": _probes(), "text": PERPLEXITY_TEXT.read_text(),
               "fluency_prompts": [r.prompt for r in requests[:generations]], "curve_points": curve_points,
               "max_new_tokens": max_new_tokens, "progress": not args.no_progress}

    def checkpoint_report(method: str, study: dict[str, Any]) -> None:
        # Written after each method so a long run leaves a usable report even if stopped early.
        write_report(study, out, title=title, header={**header, "wall time": f"{time.perf_counter() - started:.0f} s"})

    if jobs == 1:
        study = run_study(model, tokenizer, requests, methods=methods, config=config,
                          on_method_done=checkpoint_report, **options)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        payload = [r.to_dict() for r in requests]
        done: dict[str, dict[str, Any]] = {}
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_study_job, args.model, payload, m, config.to_dict(), threads, options): m
                       for m in methods}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                parts = [done[m] for m in methods if m in done]
                checkpoint_report(futures[future], parts[0] if len(parts) == 1 else merge_studies(parts))
        study = merge_studies([done[m] for m in methods], names=methods)
    header["wall time"] = f"{time.perf_counter() - started:.0f} s"
    paths = write_report(study, out, title=title, header=header)
    _print_summary(study)
    return paths


def _print_paths(paths: dict[str, Any]) -> None:
    print(f"\nreport: {paths['report']}\nmetrics: {paths['metrics']}")
    for p in paths["plots"]:
        print(f"plot: {p}")


def _jobs(args: argparse.Namespace, methods: list[str], *, auto: bool) -> int:
    """``--jobs``; without it, with ``auto``, one process per method when the CPU has a core for each."""
    if args.jobs is not None:
        if args.jobs < 1:
            raise CliError(f"--jobs must be at least 1, got {args.jobs}")
        return args.jobs
    return len(methods) if auto and (os.cpu_count() or 1) >= len(methods) > 1 else 1


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------- commands
def cmd_demo(args: argparse.Namespace) -> int:
    """Sequential edits of the shipped counterfactuals with MOSE and an additive baseline."""
    from mose_kernels.evaluation.metrics import greedy_generate

    limit = args.edits if args.edits is not None else (8 if args.quick else None)
    requests = _load_requests(str(DEMO_REQUESTS), "easyedit", limit)
    methods = _methods(args.baseline)
    model, tokenizer = _load_model(args.model)
    show = requests[: 2 if args.quick else 4]
    tokens = 8 if args.quick else 20
    before = {r.prompt: greedy_generate(model, tokenizer, r.prompt, tokens) for r in show}
    print(f"editing {len(requests)} facts sequentially with {', '.join(methods)} ...", file=sys.stderr)
    paths = _run_study(args, model, tokenizer, requests, methods, ["after-each", "after-all"],
                       title="MOSE demo: sequential counterfactual edits", generations=len(show),
                       max_new_tokens=tokens, curve_points=4, command=args.command_line,
                       jobs=_jobs(args, methods, auto=True))
    study = json.loads(paths["metrics"].read_text())
    print("\ngreedy generations before -> after (MOSE):")
    for i, r in enumerate(show):
        after = study["methods"]["mose"]["final"]["generations"][i]
        print(f"  {r.prompt!r} (new target {r.target_new!r})\n    before: {before[r.prompt]!r}\n    after:  {after!r}")
    _print_paths(paths)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """The sequential-editing study on any request file."""
    requests = _load_requests(args.requests, args.format, args.edits)
    if args.edits is not None and len(requests) < args.edits:
        logger.warning("%s holds only %d requests (asked for %d)", args.requests, len(requests), args.edits)
    methods = _method_list(args.methods) if args.methods else _methods(args.baseline)
    protocols = _protocols(args.protocol)
    model, tokenizer = _load_model(args.model)
    paths = _run_study(args, model, tokenizer, requests, methods, protocols,
                       title=f"MOSE sequential editing: {len(requests)} edits of {Path(args.requests).name}",
                       generations=args.generations, max_new_tokens=30, curve_points=args.curve_points,
                       command=args.command_line, jobs=_jobs(args, methods, auto=False))
    _print_paths(paths)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Edit a model with MOSE and save the edited model and the journal."""
    from tqdm.auto import tqdm

    from mose_kernels.editing.editor import MoseEditor

    requests = _load_requests(args.requests, args.format, args.limit)
    model, tokenizer = _load_model(args.model)
    editor = MoseEditor(model, tokenizer, _edit_config(model, args))
    out = Path(args.out)
    if args.batch:
        if editor.config.solver != "procrustes":
            raise CliError("--batch writes the requests with one closed-form rotation: it needs --solver procrustes")
        editor.edit(requests, sequential_edit=False)
    for request in tqdm([] if args.batch else requests, desc="editing", unit="edit", disable=args.no_progress):
        result = editor.edit([request])[0]
        logger.info("edit %d: %s -> %r success=%s loss=%.3f", result.edit_id, request.prompt, request.target_new,
                    result.success, result.final_loss)
    journal = editor.journal.save(out / "journal")
    _save_model(model, tokenizer, out / "model")
    ok = sum(r.success for r in editor.results)
    print(f"{len(editor.results)} edits ({ok} reached the target), edited model: {out / 'model'}, journal: {journal}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """One report from several ``mose eval`` runs of the same study (e.g. one process per method)."""
    from mose_kernels.evaluation.report import merge_studies, write_report

    studies = []
    for folder in args.runs:
        path = _existing_file(str(Path(folder) / "metrics.json"), "metrics.json of a `mose eval` run")
        try:
            studies.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise CliError(f"{path} is not valid JSON: {exc}") from exc
    study = merge_studies(studies, names=args.runs)
    header = {"command": f"`{args.command_line}`", "model": studies[0]["header"].get("model", "?"),
              "requests": studies[0]["header"].get("requests", "?"),
              "methods": ", ".join(study["methods"])}
    for folder, s in zip(args.runs, studies, strict=True):
        h = s.get("header", {})
        header[f"run {folder}"] = (f"{h.get('command', '?')} ({h.get('machine', '?')}, {h.get('date', '?')}, "
                                   f"wall time {h.get('wall time', '?')})")
    name = Path(header["requests"]).name
    paths = write_report(study, args.out, title=f"MOSE sequential editing: {study['num_requests']} edits of {name}",
                         header=header)
    _print_summary(study)
    _print_paths(paths)
    return 0


def _load_journal(path: str):
    from mose_kernels.editing.journal import EditJournal

    return EditJournal.load(_existing_file(path, "journal"))


def cmd_undo(args: argparse.Namespace) -> int:
    """Remove one edit (the last by default) from an edited model, exactly."""
    from mose_kernels.editing.config import EditConfig
    from mose_kernels.editing.editor import MoseEditor

    journal = _load_journal(args.journal)
    if not len(journal):
        raise CliError(f"journal {args.journal} is empty: nothing to undo")
    model, tokenizer = _load_model(args.model)
    editor = MoseEditor(model, tokenizer, EditConfig.from_dict(journal.config))
    editor.journal = journal
    try:
        editor.undo(args.edit_id)
    except KeyError as exc:
        raise CliError(str(exc).strip("'\"")) from exc
    out = Path(args.out)
    journal.save(out / "journal")
    _save_model(model, tokenizer, out / "model")
    print(f"undid edit {args.edit_id if args.edit_id is not None else 'last'}; {len(journal)} edits remain; "
          f"model: {out / 'model'}, journal: {out / 'journal'}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Apply a saved journal to the base model."""
    journal = _load_journal(args.journal)
    model, tokenizer = _load_model(args.model)
    journal.replay(model)
    out = Path(args.out)
    _save_model(model, tokenizer, out)
    print(f"replayed {len(journal)} edits onto {args.model}; edited model: {out}")
    return 0


# ---------------------------------------------------------------------------------------- parser
def _add_common(p: argparse.ArgumentParser, *, model_default: str | None = "smollm2-135m") -> None:
    p.add_argument("--model", default=model_default, required=model_default is None,
                   help="model folder, .gguf file or alias (smollm2-135m)" +
                        (f"; default {model_default}" if model_default else ""))
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a busy machine)")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=("gradient", "procrustes"), help="MOSE solver (default: the preset's)")
    p.add_argument("--side", choices=("input", "output"), help="rotate the projection's input or output side")
    p.add_argument("--layers", help="comma-separated layer indices (default: the preset's)")
    p.add_argument("--steps", type=int, help="optimisation steps per edit")
    p.add_argument("--num-reflections", dest="num_reflections", type=int, help="reflections per edit and layer")
    p.add_argument("--config", help="JSON file of EditConfig fields overriding the preset")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mose", description="Multiplicative orthogonal sequential editing (MOSE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="edit the shipped counterfactuals with MOSE and an additive baseline; report")
    _add_common(p)
    _add_config(p)
    p.add_argument("--out", default="mose-demo", help="report folder (default ./mose-demo)")
    p.add_argument("--baseline", default="ft", help="none, all, or a comma list of ft, rome, alphaedit (default ft)")
    p.add_argument("--edits", type=int, help="edit only the first N shipped requests")
    p.add_argument("--quick", action="store_true", help="8 edits and short generations (a smoke test)")
    p.add_argument("--jobs", type=int, help="processes, one method each (default: one per method if the CPU "
                                            "has a core for each; torch threads are shared out)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="sequential-editing study: MOSE beside additive baselines")
    _add_common(p)
    _add_config(p)
    p.add_argument("--requests", required=True, help="request file (CounterFact flat/MEMIT, zsRE)")
    p.add_argument("--format", default="auto", choices=("auto", "easyedit", "memit", "zsre"))
    p.add_argument("--edits", type=int, help="number of sequential edits (first N requests)")
    p.add_argument("--protocol", default="both", choices=("after-each", "after-all", "both"))
    p.add_argument("--baseline", default="ft,rome", help="none, all, or a comma list of ft, rome, alphaedit")
    p.add_argument("--methods", help="comma list of mose, ft, rome, alphaedit (overrides --baseline)")
    p.add_argument("--curve-points", type=int, default=8, help="checkpoints of the after-all curves")
    p.add_argument("--generations", type=int, default=5, help="greedy generations shown (fluency prompts)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--jobs", type=int, help="processes, one method each, each loading its own model copy "
                                            "(default 1); torch threads are shared out")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="one report from several `mose eval` runs of the same study")
    p.add_argument("runs", nargs="+", help="report folders of `mose eval` runs (same requests and settings)")
    p.add_argument("--out", required=True, help="report folder of the merged study")
    p.set_defaults(func=cmd_merge, threads=None)

    p = sub.add_parser("edit", help="edit a model with MOSE; save the edited model and the journal")
    _add_common(p, model_default=None)
    _add_config(p)
    p.add_argument("--requests", required=True, help="request file")
    p.add_argument("--format", default="auto", choices=("auto", "easyedit", "memit", "zsre"))
    p.add_argument("--limit", type=int, help="edit only the first N requests")
    p.add_argument("--batch", action="store_true",
                   help="procrustes solver: write all requests with one rotation per layer (one journal entry)")
    p.add_argument("--out", required=True, help="output folder (model/ and journal/)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("undo", help="remove one edit from an edited model, exactly")
    _add_common(p, model_default=None)
    p.add_argument("--journal", required=True, help="journal folder written by `mose edit`")
    p.add_argument("--edit-id", dest="edit_id", type=int, help="edit to remove (default: the last)")
    p.add_argument("--out", required=True, help="output folder (model/ and journal/)")
    p.set_defaults(func=cmd_undo)

    p = sub.add_parser("replay", help="apply a saved journal to the base model")
    _add_common(p, model_default=None)
    p.add_argument("--journal", required=True, help="journal folder written by `mose edit`")
    p.add_argument("--out", required=True, help="output folder for the edited model")
    p.set_defaults(func=cmd_replay)
    return parser


def _set_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Apply ``--threads``; without it, use one thread when the machine is already busy (load
    average above the CPU count): measured here, a small matmul took 79 ms with 2 OpenMP threads
    under load 10 on 2 cores, 5 ms with one."""
    import torch

    if threads is None:
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)
        if busy and torch.get_num_threads() > 1:
            logger.info("machine busy (load %.1f): using 1 torch thread (--threads overrides)", os.getloadavg()[0])
            torch.set_num_threads(1)
        return
    if threads < 1:
        parser.error(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mose`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "mose " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    from mose_kernels.editing.solvers.common import EditError
    from mose_kernels.evaluation.models import ModelNotFoundError

    _set_threads(parser, args.threads)
    try:
        return int(args.func(args) or 0)
    except (CliError, ModelNotFoundError, OSError, ValueError, EditError) as exc:
        if args.debug:
            raise
        message = str(exc).strip() or type(exc).__name__
        print(f"mose: error: {message.splitlines()[0]}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
