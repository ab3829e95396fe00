"""Training state files: optimiser, scheduler and loss-scaler states round-trip exactly, with no pickle."""

import json

import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors import safe_open
from safetensors.torch import save_file

from turbo_i2i.training.state_files import STRUCTURE_KEY, load_state, save_state


def stepped_states():
    """The states a trainer checkpoints, after two real steps (AdamW's per-parameter state, LambdaLR, GradScaler)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-2)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(2):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = {
        "optimizer_g": optimizer.state_dict(),
        "scheduler_g": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    return state, model, optimizer


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # same keys, same types (int parameter ids stay ints), same order
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_states_round_trip_exactly(tmp_path):
    state, _, _ = stepped_states()
    save_state(state, tmp_path / "optimizer.safetensors")
    loaded = load_state(tmp_path / "optimizer.safetensors")
    assert_same(loaded, state)
    assert isinstance(loaded["optimizer_g"]["param_groups"][0]["betas"], tuple)
    assert set(loaded["optimizer_g"]["state"]) == {0, 1, 2, 3}


def test_a_loaded_state_continues_the_optimiser_bit_for_bit(tmp_path):
    state, model, optimizer = stepped_states()
    save_state(state, tmp_path / "s.safetensors")
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-3, weight_decay=1e-2)
    twin_optimizer.load_state_dict(load_state(tmp_path / "s.safetensors")["optimizer_g"])
    x = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        net(x).square().mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_the_file_is_safetensors_with_the_structure_as_json(tmp_path):
    state, _, _ = stepped_states()
    save_state(state, tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as file:
        structure = json.loads(file.metadata()[STRUCTURE_KEY])
        assert len(list(file.keys())) == 4 * 3  # step, exp_avg, exp_avg_sq of each of the 4 parameters
    assert structure["dict"][0][0] == "optimizer_g"


def test_what_cannot_be_stored_or_read_is_named(tmp_path):
    with pytest.raises(TypeError, match="cannot store a object"):
        save_state({"x": object()}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match="cannot store a float key"):
        save_state({1.5: 1}, tmp_path / "a.safetensors")
    save_file({"0": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="holds no turbo_i2i_structure metadata"):
        load_state(tmp_path / "plain.safetensors")
    save_file({}, str(tmp_path / "lying.safetensors"), metadata={STRUCTURE_KEY: '{"tensor": "7"}'})
    with pytest.raises(ValueError, match="names tensor '7'"):
        load_state(tmp_path / "lying.safetensors")
