from __future__ import annotations

import pytest
import torch

from mose_kernels.editing.adapters import (
    capture_activations,
    capture_io,
    find_edit_targets,
    num_layers,
    rotate_activations,
    rotate_weight_,
)


def _maths_weight(target):
    w = target.weight.detach().double()
    return w if target.weight_layout == "out_in" else w.T


def test_find_targets(model):
    targets = find_edit_targets(model, [0, -1])
    assert [t.layer for t in targets] == [0, num_layers(model) - 1]
    t = targets[0]
    expected = "in_out" if model.config.model_type == "gpt2" else "out_in"
    assert t.weight_layout == expected
    assert _maths_weight(t).shape == (t.out_features, t.in_features) == (32, 96)
    with pytest.raises(ValueError, match="out of range"):
        find_edit_targets(model, [99])
    with pytest.raises(ValueError, match="twice"):
        find_edit_targets(model, [1, 1])
    with pytest.raises(ValueError, match="names no module"):
        find_edit_targets(model, [0], template="nothing.{}.here")


def test_template_override(model):
    name = find_edit_targets(model, [1])[0].name
    assert find_edit_targets(model, [1], template=name.replace(".1.", ".{}.", 1))[0].name == name


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        find_edit_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), [0])


@pytest.mark.parametrize("side", ["input", "output"])
def test_weight_and_activation_forms_agree(model, tokenizer, side):
    """The committed weight edit equals the activation-side edit, for both storage layouts."""
    target = find_edit_targets(model, [1])[0]
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with capture_io([target]) as io:
        model(input_ids=ids)
    (x, y), = io[target.name]
    V = torch.randn(3, target.dim(side))
    bias = target.bias if target.bias is not None else torch.zeros(target.out_features)
    if side == "input":
        expected = target.module(rotate_activations(x, V, side))
    else:
        expected = rotate_activations(y - bias, V, side) + bias
    W0 = _maths_weight(target).clone()
    rotate_weight_(target.weight.data, target.weight_layout, V, side)
    torch.testing.assert_close(target.module(x), expected, rtol=1e-5, atol=1e-5)
    sv0, sv1 = torch.linalg.svdvals(W0), torch.linalg.svdvals(_maths_weight(target))
    assert ((sv1 - sv0).abs() / sv0.max()).max() < 1e-5
    rotate_weight_(target.weight.data, target.weight_layout, V, side, inverse=True)
    torch.testing.assert_close(_maths_weight(target), W0, rtol=1e-5, atol=1e-6)


def test_capture_removes_hooks(model, tokenizer):
    targets = find_edit_targets(model, [0, 2])
    ids = torch.tensor([tokenizer("Apple was founded by")["input_ids"]])
    with pytest.raises(RuntimeError), capture_io(targets) as io:
        model(input_ids=ids)
        raise RuntimeError("boom")
    assert all(len(v) == 1 for v in io.values())
    assert all(not t.module._forward_hooks for t in targets)


def test_capture_activations_stops_early(model, tokenizer):
    targets = find_edit_targets(model, [0, 1])
    ids = torch.tensor([tokenizer("Apple was founded by")["input_ids"]])
    last = find_edit_targets(model, [2])
    with capture_io(targets + last) as full:
        model(input_ids=ids)
    with capture_io(last) as late:
        got = capture_activations(model, targets, input_ids=ids)
    assert not late[last[0].name]  # layer 2 never ran
    for t in targets:
        assert torch.equal(got[t.name][0], full[t.name][0][0]) and torch.equal(got[t.name][1], full[t.name][0][1])
    assert all(not t.module._forward_hooks for t in targets)


def test_offloaded_weights_are_refused_with_a_reason(model):
    """accelerate's CPU/disk offload keeps the weights on the meta device; an in-place edit of them
    would be lost, so the lookup says why it refuses."""
    accelerate = pytest.importorskip("accelerate")
    accelerate.cpu_offload(model, execution_device="cpu")
    with pytest.raises(ValueError, match="meta device"):
        find_edit_targets(model, [0])


def test_token_grid_views_flattened_tokens_and_refuses_other_shapes():
    from mose_kernels.editing.adapters import token_grid

    x = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert token_grid(x, (2, 3)) is x
    flat = x.reshape(6, 4)
    grid = token_grid(flat, (2, 3))
    assert torch.equal(grid, x)
    grid[1, 2] = -1.0  # a view: writes reach the flattened tensor
    assert (flat[5] == -1.0).all()
    with pytest.raises(ValueError, match=r"\(5, 4\).*\(2, 3\)"):
        token_grid(torch.zeros(5, 4), (2, 3))
    assert token_grid(torch.zeros(5, 4), (2, 3), required=False) is None
