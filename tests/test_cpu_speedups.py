"""The eager decoding loop's settings (`cpu_speedups.eager_decoding`) speed it up without
changing the model: every parameter is the same tensor, at the same address and version, with
the same values and layout afterwards, trainable, and the modules hold nothing extra. Whether
the samples are right is the sampler tests' job (they run through these settings)."""

import contextlib

import pytest
import torch
from conftest import randomize_

from axial_transformer import AxialTransformer, AxialTransformerConfig, cpu_speedups
from axial_transformer.sampling.sampler import sample


def tiny_model() -> AxialTransformer:
    cfg = AxialTransformerConfig(image_size=(4, 5), channels=3, dim=16, heads=2,
                                 encoder_layers=2, outer_layers=2, inner_layers=2)
    return randomize_(AxialTransformer(cfg), std=0.3, seed=0)


def model_state(model: torch.nn.Module) -> list:
    """What must not change: each parameter's identity, address, version, layout and values,
    and each module's own attributes."""
    params = [(name, id(p), p.data_ptr(), p._version, p.stride(), p.detach().clone())
              for name, p in model.named_parameters()]
    attributes = [(name, sorted(m.__dict__)) for name, m in model.named_modules()]
    return [params, attributes]


def same_state(a: list, b: list) -> bool:
    (params_a, attrs_a), (params_b, attrs_b) = a, b
    return attrs_a == attrs_b and len(params_a) == len(params_b) and all(
        x[:5] == y[:5] and torch.equal(x[5], y[5]) for x, y in zip(params_a, params_b, strict=True)
    )


@pytest.mark.parametrize("outer_inference_mode", [False, True])
def test_eager_sampling_leaves_the_model_as_it_was(outer_inference_mode):
    model = tiny_model().eval()
    before = model_state(model)
    with torch.inference_mode() if outer_inference_mode else contextlib.nullcontext():
        sample(model, 2, generator=torch.Generator().manual_seed(0))
    assert same_state(before, model_state(model))
    # The parameters are still ordinary tensors that autograd can train (not inference tensors).
    model.train().loss(torch.randint(0, 256, (2, 3, 4, 5))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_state_check_catches_attributes_left_behind(monkeypatch):
    """Negative control: settings that leave the plain references in the modules fail the check
    above."""

    @contextlib.contextmanager
    def forgetful(model):
        for m in model.modules():
            m.__dict__.update(dict(m.named_parameters(recurse=False)))
        yield

    model = tiny_model().eval()
    before = model_state(model)
    monkeypatch.setattr(cpu_speedups, "plain_attributes", forgetful)
    sample(model, 2, generator=torch.Generator().manual_seed(0))
    assert not same_state(before, model_state(model))


def test_plain_attributes_follow_a_parameter_or_module_replaced_inside():
    model = tiny_model()
    new_weight = torch.nn.Parameter(torch.zeros_like(model.to_logits.weight))
    new_norm = torch.nn.LayerNorm(16)
    with cpu_speedups.plain_attributes(model):
        assert "weight" in vars(model.to_logits)  # found without Module.__getattr__
        model.to_logits.weight = new_weight
        model.final_norm = new_norm
        assert model.to_logits.weight is new_weight and model.final_norm is new_norm
    assert "weight" not in vars(model.to_logits) and "final_norm" not in vars(model)
    assert model.to_logits.weight is new_weight and model.final_norm is new_norm
