from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from mose_kernels import householder_matrix
from mose_kernels.editing import EditConfig, EditError, EditJournal, EditRequest, MoseEditor, capture_io, edit
from mose_kernels.editing.adapters import token_grid
from mose_kernels.editing.config import preset_for
from mose_kernels.editing.solvers import procrustes
from mose_kernels.editing.solvers.common import TargetBatch, rotated_vectors, target_nll
from mose_kernels.editing.solvers.gradient import NormalizedMomentum

from .conftest import FACTS

NEW_FACTS = [
    EditRequest("The capital of France is", "France", "Rome"),
    EditRequest("Apple was founded by", "Apple", "Paris"),
    EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Rome"),
]


def _config(solver="gradient", side="input", **kw) -> dict:
    base = dict(layers=[0, 1, 2], solver=solver, side=side, num_reflections=8, steps=60, lr=0.1, edit_positions="all",
                keep_corpus=[p for p, _ in FACTS], keep_corpus_dirs=2, value_steps=60, value_lr=2.0,
                procrustes_lambda=0.0, corpus_weight=0.0, isolate_subject=False)
    # isolate_subject leaves only the subject's last token to carry an edit, and these 3-layer
    # models route little from it: pinned off whatever the preset says.
    base.update(kw)
    return base


def _weights(editor):
    return {t.name: t.weight.detach().clone() for t in editor.targets}


def _nll(model, tokenizer, request) -> tuple[float, bool]:
    batch = TargetBatch.build(tokenizer, request, [], "cpu")
    with torch.no_grad():
        loss, hit, _ = target_nll(model, batch)
    return float(loss), hit


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("solver", ["gradient", "procrustes"])
def test_edit_takes_and_preserves_spectrum(model, tokenizer, solver, side):
    editor = MoseEditor(model, tokenizer, _config(solver, side))
    before = {t.name: torch.linalg.svdvals(t.weight.detach().double()) for t in editor.targets}
    # A 3-layer model routes little from the subject token onwards: the closed form, which edits
    # at the subject's last token, gets the whole prompt as its subject.
    facts = NEW_FACTS[:2] if solver == "gradient" else [replace(r, subject=r.prompt) for r in NEW_FACTS[:2]]
    nll_before = _nll(model, tokenizer, facts[0])[0]
    results = editor.edit(facts)
    assert [r.edit_id for r in results] == [0, 1] and len(editor.journal) == 2
    nll_after, hit = _nll(model, tokenizer, facts[0])
    assert nll_after < nll_before - 1.0
    if solver == "gradient":
        assert results[0].success and hit
    for t in editor.targets:
        after = torch.linalg.svdvals(t.weight.detach().double())
        assert ((after - before[t.name]).abs() / before[t.name][0]).max() < 1e-5
    for name, s in editor.stability().items():
        assert s["max_sv_rel_change"] < 1e-5 and s["orth_error"] < 1e-5, (name, s)
    assert not any(t.module._forward_hooks or t.module._forward_pre_hooks for t in editor.targets)


def test_keep_subspace_preserves_earlier_keys_exactly(model, tokenizer):
    editor = MoseEditor(model, tokenizer, _config())
    editor.edit(NEW_FACTS[0])
    ids = torch.tensor([tokenizer("The capital of France is Rome")["input_ids"]])
    with torch.no_grad(), capture_io(editor.targets) as io:
        model(input_ids=ids)
    keys = {name: rec[0][0] for name, rec in io.items()}
    out_before = {t.name: t.module(keys[t.name]) for t in editor.targets}
    editor.edit(NEW_FACTS[1])
    for t in editor.targets:
        torch.testing.assert_close(t.module(keys[t.name]), out_before[t.name], rtol=1e-5, atol=1e-5)
    assert all(k.dim > 2 for k in editor._keep.values())


def test_undo_and_replay(model, tokenizer, tmp_path):
    base = copy.deepcopy(model)
    editor = MoseEditor(model, tokenizer, _config(steps=15))
    w0 = _weights(editor)
    editor.edit(NEW_FACTS[:2])
    w2 = _weights(editor)
    editor.edit(NEW_FACTS[2])
    # replay on a fresh base model is bit-for-bit, also after a save/load round trip
    editor.journal.save(tmp_path / "j")
    loaded = EditJournal.load(tmp_path / "j")
    assert [e.edit_id for e in loaded] == [0, 1, 2]
    assert loaded.entries[0].request == NEW_FACTS[0]
    for journal in (editor.journal, loaded):
        fresh = copy.deepcopy(base)
        journal.replay(fresh)
        for t in editor.targets:
            assert torch.equal(fresh.get_submodule(t.name).weight, t.weight)
    editor.undo()
    for t in editor.targets:
        torch.testing.assert_close(t.weight, w2[t.name], rtol=0, atol=1e-6)
    editor.undo(0)  # an earlier edit: unwind, drop, re-apply
    assert [e.edit_id for e in editor.journal] == [1]
    fresh = copy.deepcopy(base)
    editor.journal.replay(fresh)
    for t in editor.targets:
        torch.testing.assert_close(t.weight, fresh.get_submodule(t.name).weight, rtol=0, atol=1e-6)
    editor.undo()
    for t in editor.targets:
        torch.testing.assert_close(t.weight, w0[t.name], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="nothing to undo"):
        editor.undo()


def test_undo_of_the_last_edit_releases_its_keep_directions(model, tokenizer, tmp_path):
    editor = MoseEditor(model, tokenizer, _config(steps=5))
    editor.edit(NEW_FACTS[0])
    dims1 = {n: k.dim for n, k in editor._keep.items()}
    editor.edit(NEW_FACTS[1])
    assert all(editor._keep[n].dim > dims1[n] for n in dims1)
    editor.undo()
    assert {n: k.dim for n, k in editor._keep.items()} == dims1
    assert {n: s["edits"].shape[1] for n, s in editor.journal.keep_state.items()} == {
        n: k.edits.shape[1] for n, k in editor._keep.items()}
    # from a saved journal too (the added counts are stored with the entry)
    editor.edit(NEW_FACTS[1])
    editor.journal.save(tmp_path / "j")
    assert EditJournal.load(tmp_path / "j").entries[-1].metrics["keep_added"]
    # undoing an earlier edit keeps its directions (later ones were orthogonalised against them)
    dims2 = {n: k.dim for n, k in editor._keep.items()}
    editor.undo(0)
    assert {n: k.dim for n, k in editor._keep.items()} == dims2


def test_failed_undo_changes_nothing(model, tokenizer, monkeypatch):
    from mose_kernels.editing import editor as editor_module

    editor = MoseEditor(model, tokenizer, _config(steps=5))
    editor.edit(NEW_FACTS[:2])
    w, entries, keep = _weights(editor), list(editor.journal.entries), editor._keep
    real, calls = editor_module.rotate_weight_, []

    def fail_late(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after some layers were already unwound
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(editor_module, "rotate_weight_", fail_late)
    with pytest.raises(RuntimeError, match="device lost"):
        editor.undo(0)
    monkeypatch.undo()
    assert editor.journal.entries == entries and editor._keep is keep
    assert all(torch.equal(t.weight, w[t.name]) for t in editor.targets)


def _nan_solver(real):
    """``real`` (an editor's ``_run_solver``) with its vectors turned to NaN."""

    def solver(*args, **kwargs):
        result = real(*args, **kwargs)
        result.vectors = {k: v * float("nan") for k, v in result.vectors.items()}
        return result

    return solver


def test_failed_edit_changes_nothing(model, tokenizer, monkeypatch):
    editor = MoseEditor(model, tokenizer, _config(steps=10))
    editor.edit(NEW_FACTS[0])
    w1, n1, keep1 = _weights(editor), len(editor.journal), editor._keep

    def boom(request):
        raise KeyboardInterrupt

    monkeypatch.setattr(editor, "_edit_keys", boom)  # fails after the weights were rotated
    with pytest.raises(KeyboardInterrupt):
        editor.edit(NEW_FACTS[1])
    monkeypatch.undo()
    assert len(editor.journal) == n1 and editor._keep is keep1
    assert all(torch.equal(t.weight, w1[t.name]) for t in editor.targets)

    monkeypatch.setattr(editor, "_run_solver", _nan_solver(editor._run_solver))
    with pytest.raises(ValueError, match="NaN"):
        editor.edit(NEW_FACTS[1])
    assert len(editor.journal) == n1 and all(torch.equal(t.weight, w1[t.name]) for t in editor.targets)


def test_half_precision_uses_fp32_master(tokenizer, _trained):
    model = copy.deepcopy(_trained["llama"]).to(torch.bfloat16)
    base = copy.deepcopy(model)
    editor = MoseEditor(model, tokenizer, _config(steps=10))
    editor.edit(NEW_FACTS[:2])
    assert set(editor._masters) == {t.name for t in editor.targets}
    for t in editor.targets:
        assert t.weight.dtype == torch.bfloat16
        assert torch.equal(t.weight, editor._masters[t.name].to(torch.bfloat16))
    editor.journal.replay(base)
    assert all(torch.equal(base.get_submodule(t.name).weight, t.weight) for t in editor.targets)
    for s in editor.stability().values():
        assert s["max_sv_rel_change"] < 1e-5


def test_keyword_form_and_one_liner(model, tokenizer):
    editor = edit(model, tokenizer, [{"prompt": "Apple was founded by", "subject": "Apple", "target_new": "Paris"}],
                  **_config(steps=10))
    assert len(editor.results) == 1 == len(editor.journal)
    results = editor.edit(prompts=["The capital of Italy is"], target_new=["London"], subject=["Italy"],
                          ground_truth=["Rome"], locality_inputs={"nb": {"prompt": ["The capital of France is"],
                                                                          "ground_truth": ["Paris"]}})
    assert results[0].request.locality_answers == ("Paris",)
    batch = editor.edit(NEW_FACTS[:2], sequential_edit=False)
    assert [r.edit_id for r in batch] == [2, 3]


def test_gradient_solver_with_normalised_momentum_takes_and_keeps_the_spectrum(model, tokenizer):
    editor = MoseEditor(model, tokenizer, _config(optimizer="ngd", lr=0.05))
    before = {t.name: torch.linalg.svdvals(t.weight.detach().double()) for t in editor.targets}
    nll_before = _nll(model, tokenizer, NEW_FACTS[0])[0]
    result = editor.edit(NEW_FACTS[0])[0]
    nll_after, hit = _nll(model, tokenizer, NEW_FACTS[0])
    assert result.success and hit and nll_after < nll_before - 1.0
    for t in editor.targets:
        after = torch.linalg.svdvals(t.weight.detach().double())
        assert ((after - before[t.name]).abs() / before[t.name][0]).max() < 1e-5


def test_normalised_momentum_steps_along_the_gradient_at_a_relative_size():
    p = torch.tensor([3.0, 4.0], requires_grad=True)  # |p| = 5
    opt = NormalizedMomentum([p], lr=0.1, momentum=0.5)
    # first step: 0.1 |p| = 0.5 along -e_2; second: 0.1 (|p'| + half the first buffer, 0.5 * 5)
    second = 3.5 - 0.1 * ((3.0**2 + 3.5**2) ** 0.5 + 0.5 * 5.0)
    for expected in ([3.0, 3.5], [3.0, second]):
        p.grad = torch.tensor([0.0, 1e-3])  # the gradient's size does not matter, only its direction
        opt.step()
        torch.testing.assert_close(p.detach(), torch.tensor(expected))


def test_bad_requests_and_config(model, tokenizer):
    editor = MoseEditor(model, tokenizer, _config(steps=5))
    with pytest.raises(ValueError, match="does not occur"):
        editor.edit({"prompt": "The capital of France is", "subject": "Spain", "target_new": "Rome"})
    with pytest.raises(ValueError, match="target_new is empty"):
        editor.edit(prompts="The capital of France is", subject="France", target_new="")
    with pytest.raises(TypeError, match="EditRequest or a dict"):
        editor.edit([42])
    with pytest.raises(ValueError, match="unknown EditConfig keys"):
        EditConfig.from_dict({"layer": [1]})
    with pytest.raises(ValueError, match="solver"):
        EditConfig(solver="rome")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        EditConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="even"):
        MoseEditor(model, tokenizer, _config(num_reflections=3)).edit(NEW_FACTS[0])
    assert len(editor.journal) == 0


def test_keep_max_dim_caps_the_subspace_and_edits_still_take(model, tokenizer, tmp_path):
    """``keep_max_dim`` bounds every layer's keep subspace (memory ``O(n keep_max_dim)``, not a
    fraction of ``n``): the edits go past the cap, are compressed, still take, and a saved
    journal reloads with the same cap."""
    cap = 12
    editor = MoseEditor(model, tokenizer, _config(keep_max_dim=cap))
    uncapped = MoseEditor(copy.deepcopy(model), tokenizer, _config())
    for fact in NEW_FACTS:
        assert editor.edit(fact)[0].success
        uncapped.edit(fact)
    assert all(k.max_dim == cap and 2 < k.dim <= cap for k in editor._keep.values())
    assert all(k.dim > cap for k in uncapped._keep.values())  # the cap, not the fraction, bound it
    assert all(_nll(model, tokenizer, fact)[1] for fact in NEW_FACTS[1:])
    editor.journal.save(tmp_path / "journal")
    reloaded = MoseEditor(model, tokenizer, _config(keep_max_dim=cap))
    reloaded.journal = EditJournal.load(tmp_path / "journal")
    assert all(k.max_dim == cap and k.dim <= cap for k in reloaded._init_keep().values())
    assert EditConfig(keep_max_dim=cap).keep_room(1536) == cap and EditConfig().keep_room(1536) == 1152
    assert EditConfig().keep_room(14336) == 4096 and EditConfig(keep_max_dim=None).keep_room(14336) == 10752
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="keep_max_dim"):
            EditConfig(keep_max_dim=bad)


def test_keep_corpus_sources(model, tokenizer, monkeypatch):
    """``keep_corpus=None`` reads the shipped corpus, ``"model-samples"`` samples the model, a list
    is used as given; other strings and empty lists are refused."""
    from mose_kernels.editing import config as config_module

    shipped = config_module.shipped_keep_corpus()
    assert len(shipped) > 400 and all(t.strip() for t in shipped)
    seen, text_batches = [], MoseEditor._text_batches

    def spy(self, texts):
        seen.append(len(texts))
        return text_batches(self, texts)

    monkeypatch.setattr(MoseEditor, "_text_batches", spy)
    for corpus, count in ((None, len(shipped)), ("model-samples", 32), (["Bees make honey."], 1)):
        editor = MoseEditor(model, tokenizer, _config(steps=2, keep_corpus=corpus))
        editor.edit(NEW_FACTS[0])
        assert seen[-1] == count, corpus
    with pytest.raises(ValueError, match="model-samples"):
        EditConfig(keep_corpus="wikitext")
    with pytest.raises(ValueError, match="non-empty text"):
        EditConfig(keep_corpus=[])


def test_presets(model):
    config = preset_for(model)
    assert config.layers and max(config.layers) < model.config.num_hidden_layers
    assert config.solver == "gradient"


def test_reflections_of_orthogonal_matrix():
    for r in (1, 2, 5):
        M = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
        V = procrustes.reflections_of(M)
        assert V.shape[0] <= 2 * r
        torch.testing.assert_close(householder_matrix(V), M, rtol=0, atol=1e-12)
    a = torch.randn(3, 40, dtype=torch.float64)
    b = torch.randn(3, 40, dtype=torch.float64)
    b = b * a.norm(dim=1, keepdim=True) / b.norm(dim=1, keepdim=True)
    V = procrustes.rotation_vectors(a[:1], b[:1], None, None, 0.0, "output")
    torch.testing.assert_close(householder_matrix(V) @ a[0], b[0], rtol=0, atol=1e-10)
    with pytest.raises(EditError, match="no room"):
        from mose_kernels.editing.keep import KeepSubspace

        keep = KeepSubspace.empty(40, capacity=1.0).add(torch.randn(60, 40))
        procrustes.rotation_vectors(a[:1], b[:1], keep, None, 0.0, "input")


@pytest.mark.parametrize("side", ["input", "output"])
def test_procrustes_target_moves_only_outside_the_keep_subspace(model, tokenizer, side):
    """The searched target differs from the key only outside the keep subspace, at the same norm,
    so the committed rotation (which fixes the keep subspace) maps the key onto it exactly."""
    from mose_kernels.editing.keep import KeepSubspace

    editor = MoseEditor(model, tokenizer, _config("procrustes", side))
    request = replace(NEW_FACTS[0], subject=NEW_FACTS[0].prompt)
    n = editor.targets[0].dim(side)
    keep = {t.name: KeepSubspace.empty(n, capacity=1.0).add(torch.randn(n // 2, n, generator=torch.Generator()
                                                                         .manual_seed(i)))
            for i, t in enumerate(editor.targets)}
    batch = TargetBatch.build(tokenizer, request, [], "cpu")
    config = EditConfig(**_config("procrustes", side))
    base, goal, _, _, _ = procrustes._search_targets(model, editor.targets, batch, config, keep)
    for t in editor.targets:
        a, b, B = base[t.name].double(), goal[t.name].double(), keep[t.name].basis
        assert (b - a).norm() > 1e-3 * a.norm()  # the search moved it
        torch.testing.assert_close((b - a) @ B, torch.zeros(1, B.shape[1], dtype=torch.float64), rtol=0,
                                   atol=1e-5 * float(a.norm()))
        torch.testing.assert_close(b.norm(), a.norm(), rtol=1e-5, atol=0)
        V = procrustes.rotation_vectors(a, b, keep[t.name], None, 0.0, side)
        Q = householder_matrix(V)
        rotated = (Q.T if side == "input" else Q) @ a[0]
        torch.testing.assert_close(rotated, b[0], rtol=0, atol=1e-4 * float(a.norm()))


@pytest.mark.parametrize("solver", ["procrustes", "gradient"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_isolated_edit_acts_on_the_subject_token_alone(model, tokenizer, solver, side):
    config = _config(solver, side, layers=[1], isolate_subject=True,
                     context_prefixes=["Michel Rocard is a native speaker of French."])
    editor = MoseEditor(model, tokenizer, config)
    request = replace(NEW_FACTS[0], subject="The capital of France")
    batch = TargetBatch.build(tokenizer, request, config["context_prefixes"], "cpu")
    target = editor.targets[0]

    def outputs():
        with torch.no_grad(), capture_io([target]) as io:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return io[target.name][0][1]

    before = outputs()
    editor.edit(request)
    after = outputs()
    last = batch.subject_last()
    rows = torch.arange(batch.input_ids.shape[0])
    others = batch.attention_mask.bool().clone()
    others[rows, last] = False
    scale = before.norm(dim=-1).max()
    assert (after[rows, last] - before[rows, last]).norm(dim=-1).min() > 1e-3 * scale
    # keep_tol drops the weakest key directions, so the other positions move by at most ~keep_tol
    assert (after[others] - before[others]).norm(dim=-1).max() < 1e-2 * scale


def test_rotated_vectors_stop_at_the_last_target_and_match_a_full_forward(model, tokenizer):
    editor = MoseEditor(model, tokenizer, _config(layers=[0, 2]))
    batch = TargetBatch.build(tokenizer, NEW_FACTS[0], ["Michel Rocard is a native speaker of French."], "cpu")
    with torch.no_grad(), capture_io(editor.targets) as io:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for side in ("input", "output"):
        got = rotated_vectors(model, editor.targets, batch, side)
        for t in editor.targets:
            x, y = io[t.name][0]
            want = x if side == "input" else (y - t.bias if t.bias is not None else y)
            torch.testing.assert_close(got[t.name], token_grid(want, batch.input_ids.shape), rtol=0, atol=0)


def test_edit_positions_masks(tokenizer):
    request = EditRequest("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Rome")
    batch = TargetBatch.build(tokenizer, request, ["Michel Rocard is a native speaker of French."], "cpu")
    subject = batch.positions("subject")
    last = batch.positions("subject_last")
    assert batch.positions("all") is None and subject.shape == last.shape == batch.input_ids.shape
    assert (last.sum(1) == 1).all() and not (last & ~subject).any()
    for row in range(2):
        span = torch.nonzero(subject[row]).flatten()
        assert span.numel() >= 2 and bool(last[row, span.max()])  # the subject's last token
    with pytest.raises(ValueError, match="edit_positions"):
        batch.positions("object")


@pytest.mark.parametrize("positions", ["subject", "subject_last"])
def test_kl_prefixes_and_subject_positions(model, tokenizer, positions):
    config = _config(kl_weight=1.0, neighbour_prompts=["The capital of Italy is", "Apple was founded by"],
                     context_prefixes=["Michel Rocard is a native speaker of French."], edit_positions=positions)
    editor = MoseEditor(model, tokenizer, config)
    nll_before = _nll(model, tokenizer, NEW_FACTS[0])[0]
    result = editor.edit(NEW_FACTS[0])[0]
    assert result.steps > 0 and _nll(model, tokenizer, NEW_FACTS[0])[0] < nll_before


@pytest.mark.parametrize("side", ["input", "output"])
def test_procrustes_batch_writes_all_requests_with_one_rotation(model, tokenizer, side, tmp_path):
    """``sequential_edit=False`` with the closed form: one rotation per layer writes every request,
    journalled as one entry that saves, replays and undoes as a whole."""
    base = copy.deepcopy(model)
    editor = MoseEditor(model, tokenizer, _config("procrustes", side))
    w0 = _weights(editor)
    facts = [replace(r, subject=r.prompt) for r in NEW_FACTS[:2]]
    nll_before = [_nll(model, tokenizer, r)[0] for r in facts]
    results = editor.edit(facts, sequential_edit=False)
    assert [r.edit_id for r in results] == [0, 0] and len(editor.journal) == 1
    assert editor.journal.entries[0].requests == facts
    assert results[0].extra["batch_size"] == 2
    for r, before in zip(facts, nll_before, strict=True):
        assert _nll(model, tokenizer, r)[0] < before - 1.0
    for s in editor.stability().values():
        assert s["max_sv_rel_change"] < 1e-5 and s["orth_error"] < 1e-5
    editor.journal.save(tmp_path / "j")
    loaded = EditJournal.load(tmp_path / "j")
    assert loaded.entries[0].requests == facts
    fresh = copy.deepcopy(base)
    loaded.replay(fresh)
    for t in editor.targets:
        assert torch.equal(fresh.get_submodule(t.name).weight, t.weight)
    dims = {n: k.dim for n, k in editor._keep.items()}
    editor.undo()
    for t in editor.targets:
        torch.testing.assert_close(t.weight, w0[t.name], rtol=0, atol=1e-6)
    assert all(editor._keep[n].dim < dims[n] for n in dims)  # both requests' keys released


def test_procrustes_batch_matches_single_solve_for_one_request(model, tokenizer):
    config = EditConfig.from_dict(_config("procrustes"))
    editor = MoseEditor(model, tokenizer, config)
    editor._keep = editor._init_keep()
    fact = replace(NEW_FACTS[0], subject=NEW_FACTS[0].prompt)
    one = procrustes.solve(model, tokenizer, editor.targets, fact, editor._keep, config, editor._corpus_acts)
    batch = procrustes.solve_batch(model, tokenizer, editor.targets, [fact], editor._keep, config,
                                   editor._corpus_acts)
    for name, V in one.vectors.items():
        assert torch.equal(V, batch.vectors[name])


def test_keep_neighbours_leave_the_relation_asked_of_other_subjects_unchanged(model, tokenizer):
    # A 3-layer model routes little from the subject onwards, so with the relation kept fixed the
    # edit cannot fully take; it must still move the target while other subjects stay as they were.
    request = NEW_FACTS[2]
    plain = MoseEditor(copy.deepcopy(model), tokenizer, _config())
    plain.edit(request)
    editor = MoseEditor(model, tokenizer, _config(keep_neighbours=2))
    neighbours = editor._neighbour_prompts(request)
    assert len(neighbours) == 2 and len(set(neighbours)) == 2
    assert all(p.startswith("The mother tongue of ") and request.subject not in p for p in neighbours)
    ids = [torch.tensor([tokenizer(p)["input_ids"]]) for p in neighbours]
    with torch.no_grad():
        before = [model(input_ids=x).logits for x in ids]
    nll_before = _nll(model, tokenizer, request)[0]
    editor.edit(request)
    assert _nll(model, tokenizer, request)[0] < nll_before - 1.0
    with torch.no_grad():
        for x, logits in zip(ids, before, strict=True):
            torch.testing.assert_close(model(input_ids=x).logits, logits, rtol=1e-4, atol=1e-4)
    # kept for that edit only: the stored subspaces grow by the edit's own keys, as without them
    assert {n: k.dim for n, k in editor._keep.items()} == {n: k.dim for n, k in plain._keep.items()}
    with pytest.raises(ValueError, match="keep_neighbours"):
        EditConfig(keep_neighbours=-1)


def _corpus_change(editor) -> float:
    """The last edit's relative change (squared) of the corpus outputs, summed over layers."""
    from mose_kernels.editing.adapters import rotate_activations

    entry, total = editor.journal.entries[-1], 0.0
    for t in editor.targets:
        x = editor._corpus_acts[t.name]
        w = (t.weight if t.weight_layout == "out_in" else t.weight.T).detach().float()
        d = rotate_activations(x, entry.vectors[t.name].float(), "input") - x
        total += float((d @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    return total


def test_corpus_weight_shrinks_the_change_of_the_corpus_outputs(model, tokenizer):
    changes = []
    for weight in (0.0, 100.0):
        editor = MoseEditor(copy.deepcopy(model), tokenizer, _config(corpus_weight=weight, lr=0.05))
        nll_before = _nll(editor.model, tokenizer, NEW_FACTS[2])[0]
        editor.edit(NEW_FACTS[2])
        assert _nll(editor.model, tokenizer, NEW_FACTS[2])[0] < nll_before - 1.0
        changes.append(_corpus_change(editor))
    assert changes[1] < 0.7 * changes[0], changes
    with pytest.raises(ValueError, match="corpus_weight"):
        EditConfig(corpus_weight=-1.0)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("pairs", [False, True])
def test_output_change_matches_the_rotated_activations(side, pairs):
    """The penalty from rows and from their second moment equals the change of the rotated
    vectors' outputs, and the energy their outputs' squared norm."""
    from mose_kernels.editing.adapters import rotate_activations
    from mose_kernels.editing.solvers.penalty import HeldOutputs

    gen = torch.Generator().manual_seed(0)
    n, m = 37, 23
    dim = n if side == "input" else m
    Vs = torch.randn(3 if pairs else 6, dim, generator=gen, dtype=torch.float64)
    if pairs:  # the solver's start: equal pairs, the identity
        Vs = Vs.repeat_interleave(2, dim=0)
    x = torch.randn(63, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(m, n, generator=gen, dtype=torch.float64)
    d = rotate_activations(x, Vs, side, backend="reference") - x
    expected = (d @ weight.T if side == "input" else d).pow(2).sum()
    energy = (x @ weight.T if side == "input" else x).pow(2).sum()
    for held in (HeldOutputs(rows=x), HeldOutputs(gram=x.T @ x)):
        got = held.change(Vs, weight, side)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        assert held.energy(weight, side) == pytest.approx(float(energy), rel=1e-12)
        if pairs:
            assert float(got) < 1e-20
    # the gradients agree too (the solver differentiates through the penalty)
    grads = []
    for held in (HeldOutputs(rows=x), HeldOutputs(gram=x.T @ x)):
        V = Vs.clone().requires_grad_()
        held.change(V, weight, side).backward()
        grads.append(V.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def test_held_outputs_rejects_bad_input():
    from mose_kernels.editing.solvers.penalty import HeldOutputs

    with pytest.raises(ValueError, match="exactly one"):
        HeldOutputs()
    with pytest.raises(ValueError, match="exactly one"):
        HeldOutputs(rows=torch.zeros(2, 3), gram=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="square"):
        HeldOutputs(gram=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="side"):
        HeldOutputs(rows=torch.zeros(2, 3)).energy(torch.zeros(4, 3), "both")


def test_a_loaded_journal_keeps_its_subspaces_with_the_corpus_penalty(model, tokenizer, tmp_path):
    """A fresh editor given a saved journal (``mose undo`` does this) reads the stored keep
    subspaces as they were; the corpus penalty only loads the corpus activations beside them."""
    config = _config(steps=5, corpus_weight=10.0)
    editor = MoseEditor(copy.deepcopy(model), tokenizer, config)
    editor.edit(NEW_FACTS[:2])
    editor.journal.save(tmp_path / "j")
    resumed = MoseEditor(copy.deepcopy(model), tokenizer, config)
    resumed.journal = EditJournal.load(tmp_path / "j")
    keep = resumed._init_keep()
    for name, k in editor._keep.items():
        assert torch.equal(keep[name].edits, k.edits) and torch.equal(keep[name].corpus, k.corpus)
    assert resumed._corpus_acts is not None and set(resumed._corpus_acts) == set(keep)


def _dispatched(model):
    """``model`` dispatched by accelerate block by block (every block on the CPU, with the hooks
    that move activations between devices under ``device_map="auto"``)."""
    accelerate = pytest.importorskip("accelerate")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in (model._no_split_modules or [])]
    device_map = dict.fromkeys(blocks, "cpu")
    for name, _ in model.named_parameters(remove_duplicate=False):  # tied heads too
        if not any(name.startswith(b + ".") for b in blocks):
            device_map[name.rsplit(".", 1)[0]] = "cpu"
    assert blocks, "the test models name their blocks in _no_split_modules"
    out = accelerate.dispatch_model(model, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(out.get_submodule(blocks[0]), "_hf_hook")
    return out


@pytest.mark.parametrize("solver", ["gradient", "procrustes"])
def test_a_model_dispatched_by_accelerate_edits_and_undoes_like_a_plain_one(model, tokenizer, solver):
    plain = copy.deepcopy(model)
    dispatched = _dispatched(model)
    config = _config(solver, steps=10, value_steps=10, corpus_weight=100.0, kl_weight=1.0,
                     neighbour_prompts=["The capital of Italy is"], edit_positions="subject")
    facts = NEW_FACTS[:2] if solver == "gradient" else [replace(r, subject=r.prompt) for r in NEW_FACTS[:2]]
    editors = [MoseEditor(m, tokenizer, config) for m in (plain, dispatched)]
    w0 = _weights(editors[0])
    results = [e.edit(facts) for e in editors]
    assert [r.steps for r in results[0]] == [r.steps for r in results[1]]
    for a, b in zip(editors[0].targets, editors[1].targets, strict=True):
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=1e-6)
        assert not torch.equal(b.weight, w0[a.name])
    editors[1].undo()
    editors[1].undo()
    for t in editors[1].targets:
        torch.testing.assert_close(t.weight, w0[t.name], rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (a model split by a device_map)")
@pytest.mark.parametrize("solver", ["gradient", "procrustes"])
def test_a_model_split_over_two_gpus_edits_like_one_on_a_single_device(model, tokenizer, solver):
    accelerate = pytest.importorskip("accelerate")
    single = copy.deepcopy(model).to("cuda:0")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in (model._no_split_modules or [])]
    device_map = {b: f"cuda:{int(i >= len(blocks) // 2)}" for i, b in enumerate(blocks)}
    for name, _ in model.named_parameters(remove_duplicate=False):
        if not any(name.startswith(b + ".") for b in blocks):
            device_map[name.rsplit(".", 1)[0]] = "cuda:1"
    split = accelerate.dispatch_model(model, device_map=device_map)
    config = _config(solver, steps=10, value_steps=10, corpus_weight=100.0, kl_weight=1.0,
                     neighbour_prompts=["The capital of Italy is"], edit_positions="subject")
    facts = NEW_FACTS[:2] if solver == "gradient" else [replace(r, subject=r.prompt) for r in NEW_FACTS[:2]]
    editors = [MoseEditor(m, tokenizer, config) for m in (single, split)]
    for e in editors:
        e.edit(facts)
    assert len({t.weight.device for t in editors[1].targets}) == 2
    for a, b in zip(editors[0].targets, editors[1].targets, strict=True):
        torch.testing.assert_close(b.weight.cpu(), a.weight.cpu(), rtol=1e-4, atol=1e-5)


def _bank_change(editor, bank) -> float:
    """The last edit's relative change (squared) of the outputs of ``bank``'s keys, summed over layers."""
    from mose_kernels.editing.adapters import rotate_activations

    entry, total = editor.journal.entries[-1], 0.0
    for t in editor.targets:
        x = bank[t.name]
        w = (t.weight if t.weight_layout == "out_in" else t.weight.T).detach().float()
        d = rotate_activations(x, entry.vectors[t.name].float(), "input") - x
        total += float((d @ w.T).pow(2).sum() / (x @ w.T).pow(2).sum())
    return total


def test_edit_keys_weight_holds_earlier_edits_outputs_the_keep_subspace_released(model, tokenizer):
    """Without the hard keep subspace (as after its compression), the penalty on earlier edits'
    banked keys shrinks how much a later edit changes their outputs."""
    changes = []
    for weight in (0.0, 100.0):
        editor = MoseEditor(copy.deepcopy(model), tokenizer,
                            _config(keep_edits=False, keep_corpus_dirs=0, edit_keys_weight=weight, lr=0.05))
        editor.edit(NEW_FACTS[:2])
        bank = editor._edit_keys(NEW_FACTS[:2])
        if weight:  # narrow layers: the exact second moment of every key
            assert editor._key_bank.seen == next(iter(bank.values())).shape[0]
            first = min(editor.targets, key=lambda t: t.layer).name  # no edit changes its inputs
            torch.testing.assert_close(editor._key_bank.grams[first], bank[first].double().T @ bank[first].double())
        nll_before = _nll(editor.model, tokenizer, NEW_FACTS[2])[0]
        editor.edit(NEW_FACTS[2])
        assert _nll(editor.model, tokenizer, NEW_FACTS[2])[0] < nll_before - 1.0
        changes.append(_bank_change(editor, bank))
    assert changes[1] < 0.5 * changes[0], changes
    with pytest.raises(ValueError, match="edit_keys_weight"):
        EditConfig(edit_keys_weight=-1.0)


def test_edit_keys_weight_waits_until_the_keep_subspace_releases_directions(model, tokenizer):
    """While the keep subspace holds every earlier key the edit's vectors are orthogonal to them,
    so the penalty is skipped: the edits are bit-identical to those without it. Once compression
    released directions it acts again."""
    def journal_vectors(weight: float, **kw) -> tuple[MoseEditor, list]:
        editor = MoseEditor(copy.deepcopy(model), tokenizer, _config(steps=8, edit_keys_weight=weight, **kw))
        editor.edit(NEW_FACTS)
        return editor, [e.vectors for e in editor.journal]

    _, plain = journal_vectors(0.0)
    editor, held = journal_vectors(100.0)
    assert all(k.released == 0 for k in editor._keep.values())
    for a, b in zip(plain, held, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)
    # a keep subspace of 6 directions (2 corpus + 4 edit) releases keys from the first edit on
    editor, held = journal_vectors(100.0, keep_max_dim=6)
    _, plain = journal_vectors(0.0, keep_max_dim=6)
    assert all(k.released > 0 for k in editor._keep.values())
    assert all(torch.equal(plain[0][name], held[0][name]) for name in plain[0])  # no earlier keys yet
    assert not all(torch.equal(plain[-1][name], held[-1][name]) for name in plain[-1])


@pytest.mark.parametrize("wide", [False, True])
def test_key_bank_restored_by_a_failed_edit_and_rebuilt_from_a_journal(model, tokenizer, monkeypatch, wide, tmp_path):
    """Narrow layers bank the second moment of every key; wide ones (forced here) a bounded
    uniform sample of them. A failed edit leaves the bank as it was; a fresh editor given the
    saved journal rebuilds the bank from the journal's requests."""
    import mose_kernels.editing.key_bank as key_bank

    if wide:
        monkeypatch.setattr(key_bank, "GRAM_MAX_DIM", 0)
        monkeypatch.setattr(key_bank, "KEY_BANK_ROWS", 7)
    config = _config(steps=5, edit_keys_weight=10.0)
    editor = MoseEditor(copy.deepcopy(model), tokenizer, config)
    editor.edit(NEW_FACTS[:2])
    bank = editor._key_bank
    all_keys = editor._edit_keys(NEW_FACTS[:2])
    assert bank.seen == next(iter(all_keys.values())).shape[0] > 7
    if wide:
        assert not bank.grams and all(rows.shape[0] == 7 for rows in bank.rows.values())
        for name, rows in bank.rows.items():  # every banked row is one of the keys the edits wrote through
            dist = torch.cdist(rows.double(), all_keys[name].double()).min(dim=1).values
            assert float(dist.max()) < 1e-3 * float(all_keys[name].norm(dim=1).max())
    else:
        assert not bank.rows and set(bank.grams) == set(all_keys)
    monkeypatch.setattr(editor, "_run_solver", _nan_solver(editor._run_solver))
    with pytest.raises(ValueError, match="NaN"):
        editor.edit(NEW_FACTS[2])
    assert editor._key_bank is bank
    # a loaded journal: the earlier edits' keys, read on the model as it is now
    editor.journal.save(tmp_path / "j")
    resumed = MoseEditor(copy.deepcopy(editor.model), tokenizer, config)
    resumed.journal = EditJournal.load(tmp_path / "j")
    resumed.edit(NEW_FACTS[2])
    assert resumed._key_bank.seen > bank.seen
    with pytest.raises(ValueError, match="cover the bank's layers"):
        bank.added({})
