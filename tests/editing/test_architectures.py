"""Every architecture the adapters name, as a tiny random model built from its config: the MLP
output projection is found with its layout, the solver's target loss is the model's own, and an
edit lowers the target's NLL, keeps the spectrum and undoes exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mose_kernels.editing import EditRequest, MoseEditor
from mose_kernels.editing.adapters import TEMPLATES, capture_io, find_edit_targets
from mose_kernels.editing.solvers.common import StepWindow, TargetBatch, rotation_hooks, target_nll
from mose_kernels.editing.tokens import encode_prompt_target

from .conftest import FACTS, overfit

HIDDEN, INNER = 32, 64
DECODER = dict(hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64)
# model_type -> (config class name, config fields)
CONFIGS = {
    "llama": ("LlamaConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "qwen3": ("Qwen3Config", {**DECODER, "head_dim": 16}),
    "mistral": ("MistralConfig", DECODER),
    "gemma": ("GemmaConfig", {**DECODER, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 16, "final_logit_softcapping": 5.0}),
    "phi3": ("Phi3Config", {**DECODER, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_inner=INNER, n_layer=2, n_head=2, n_positions=64)),
    "gptj": ("GPTJConfig", dict(n_embd=HIDDEN, n_inner=INNER, n_layer=2, n_head=2, n_positions=64, rotary_dim=8)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=64)),
    "opt": ("OPTConfig", dict(hidden_size=HIDDEN, ffn_dim=INNER, num_hidden_layers=2, num_attention_heads=2,
                              word_embed_proj_dim=HIDDEN, max_position_embeddings=64)),
}
REQUEST = EditRequest("The capital of France is", "France", "Rome")


def test_every_template_has_a_config_here():
    assert set(CONFIGS) == set(TEMPLATES)


def _build(model_type: str, vocab_size: int) -> nn.Module:
    import transformers

    name, fields = CONFIGS[model_type]
    config = getattr(transformers, name)(vocab_size=vocab_size, **fields)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=sorted(CONFIGS))
def arch_model(request, tokenizer):
    """The tiny model, trained on :data:`FACTS` so that it predicts confidently (an edit then has
    something to change, and Gemma 2's soft cap acts on its logits)."""
    return overfit(_build(request.param, len(tokenizer)), tokenizer)


def _direct_nll(model, tokenizer, request: EditRequest) -> float:
    enc = encode_prompt_target(tokenizer, request.prompt, request.target_new)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids.unsqueeze(0)).logits[0, :-1]
    pos = torch.arange(enc.prompt_length - 1, enc.input_ids.numel() - 1)
    return float(F.cross_entropy(logits[pos].float(), enc.target_ids))


def test_projection_is_found_with_its_layout(arch_model):
    model_type = arch_model.config.model_type
    targets = find_edit_targets(arch_model, [0, 1])
    assert [t.name for t in targets] == [TEMPLATES[model_type].format(i) for i in (0, 1)]
    t = targets[0]
    assert t.weight_layout == ("in_out" if model_type == "gpt2" else "out_in")
    assert (t.out_features, t.in_features) == (HIDDEN, INNER)


def test_solver_loss_is_the_models_own(arch_model, tokenizer):
    """The solver applies the LM head to the target positions alone; its NLL must equal the one of
    the model's own logits (Gemma 2's final soft-capping included)."""
    with torch.no_grad():
        loss = float(target_nll(arch_model, TargetBatch.build(tokenizer, REQUEST, [], "cpu"))[0])
    assert loss == pytest.approx(_direct_nll(arch_model, tokenizer, REQUEST), rel=1e-5)


@pytest.mark.parametrize("side", ["input", "output"])
def test_step_window_loss_and_gradient_equal_the_full_forward(arch_model, tokenizer, side):
    """The gradient solver runs only the tokens from the subject on, the prefix coming from a
    key/value cache: its loss and gradients must equal the full forward's, whatever the cache type,
    position embedding or padding (rows with context prefixes are longer)."""
    targets = find_edit_targets(arch_model, [0, 1])
    request = EditRequest("Today we learn that the capital of France is", "France", "Rome")
    batch = TargetBatch.build(tokenizer, request, ["A fact.", "Read this short fact about France."], "cpu")
    positions = batch.positions("subject")
    window = StepWindow.build(arch_model, batch, positions)
    assert window.start >= 3 and window.cache is not None
    torch.manual_seed(1)
    V = torch.randn(4, targets[0].dim(side), requires_grad=True)

    def loss_and_grad(step_window):
        V.grad = None
        mask = positions if step_window is None else step_window.positions(positions)
        with torch.enable_grad(), rotation_hooks(targets, lambda name: V, side, mask):
            loss, hit, _ = target_nll(arch_model, batch, step_window)
            loss.backward()
        return float(loss), hit, V.grad.clone()

    full, full_hit, full_grad = loss_and_grad(None)
    for _ in range(2):  # the cache is reused, never extended in place
        part, part_hit, part_grad = loss_and_grad(window)
        assert part == pytest.approx(full, rel=1e-5) and part_hit == full_hit
        torch.testing.assert_close(part_grad, full_grad, rtol=1e-4, atol=1e-6 * float(full_grad.abs().max()))


def test_step_window_without_positions_runs_every_token(arch_model, tokenizer):
    batch = TargetBatch.build(tokenizer, REQUEST, [], "cpu")
    window = StepWindow.build(arch_model, batch, None)
    assert (window.start, window.cache) == (0, None)
    with torch.no_grad():
        assert float(target_nll(arch_model, batch, window)[0]) == pytest.approx(
            float(target_nll(arch_model, batch)[0]), rel=1e-6)


@pytest.mark.parametrize("solver", ["gradient", "procrustes"])
def test_edit_lowers_the_target_nll_keeps_the_spectrum_and_undoes(arch_model, tokenizer, solver):
    config = dict(layers=[0, 1], solver=solver, num_reflections=8, steps=60, lr=0.1, edit_positions="all",
                  keep_corpus=[p for p, _ in FACTS], keep_corpus_dirs=2, value_steps=60, value_lr=2.0,
                  procrustes_lambda=0.0, isolate_subject=False)
    # A 2-layer model routes little from the subject onwards: the closed form, which edits at the
    # subject's last token, gets the whole prompt as its subject (as in test_editor.py), and the
    # gradient solver is not isolated to that token (pinned off whatever the preset says).
    request = REQUEST if solver == "gradient" else EditRequest(REQUEST.prompt, REQUEST.prompt, REQUEST.target_new)
    editor = MoseEditor(arch_model, tokenizer, config)
    base = {t.name: t.weight.detach().clone() for t in editor.targets}
    svals = {name: torch.linalg.svdvals(w.double()) for name, w in base.items()}
    before = _direct_nll(arch_model, tokenizer, request)
    editor.edit(request)
    after = _direct_nll(arch_model, tokenizer, request)
    assert after < before - 0.5, (before, after)
    for t in editor.targets:
        s = torch.linalg.svdvals(t.weight.detach().double())
        assert ((s - svals[t.name]).abs() / svals[t.name][0]).max() < 1e-5
    editor.undo()
    for t in editor.targets:
        torch.testing.assert_close(t.weight.detach(), base[t.name], rtol=1e-5, atol=1e-6)


def test_rank_one_baseline_edits_every_architecture(arch_model, tokenizer):
    from mose_kernels.evaluation.baselines import RankOneEditor

    editor = RankOneEditor(arch_model, tokenizer, 1, value_steps=15, corpus=[p for p, _ in FACTS])
    request = EditRequest(REQUEST.prompt, REQUEST.prompt, REQUEST.target_new)
    before = _direct_nll(arch_model, tokenizer, request)
    editor.edit([request])
    assert _direct_nll(arch_model, tokenizer, request) < before - 0.5


def test_rotation_hooks_act_on_the_subject_positions_only(arch_model, tokenizer):
    """With ``edit_positions="subject"`` the solver's rotation must reach the subject's tokens and no
    other, whatever the layout of the projection's activations (OPT flattens them to ``(B * L, d)``)."""
    targets = find_edit_targets(arch_model, [0])
    batch = TargetBatch.build(tokenizer, REQUEST, [], "cpu")
    positions = batch.positions("subject")
    V = torch.randn(4, INNER)

    def inputs() -> torch.Tensor:
        with capture_io(targets, detach=True) as io:
            arch_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        x = io[targets[0].name][0][0]
        return x.reshape(*batch.input_ids.shape, INNER)

    plain = inputs()
    with capture_io(targets) as io, rotation_hooks(targets, lambda name: V, "input", positions):
        arch_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    seen = io[targets[0].name][0][0].reshape(*batch.input_ids.shape, INNER)  # what the projection got
    torch.testing.assert_close(seen[~positions], plain[~positions])
    assert int(positions.sum()) >= 1
    assert (seen[positions] - plain[positions]).norm() > 1e-3 * plain[positions].norm()
