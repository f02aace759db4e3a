"""After any causal call, failed or not, the model has no hooks and no SAEs and gives bit-identical logits.

Failures are injected where leaks happen: mid-generation (steering hook attached, KV cache half built),
mid-forward with the SAE spliced in and the ablation hook attached, and mid-backward in attribution.
"""

from __future__ import annotations

import random

import pytest
import torch

from sae_mcp.engine import ablation, generation, steering
from sae_mcp.engine import attribution as attr
from sae_mcp.engine.runtime import CancelToken
from sae_mcp.errors import Cancelled, InvalidInput

PROMPT = "the cat sat on the mat and the dog"


class Boom(RuntimeError):
    pass


class CancelAfter(CancelToken):
    """Cancels itself at the n-th check: a cancellation in the middle of generation."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def check(self) -> None:
        self.n -= 1
        if self.n <= 0:
            self.cancel()
        super().check()


def steer_ok(e, mp):
    steering.steer_generate(e, steering.SteeringRequest(PROMPT, ((5, 3.0),), calibration="absolute", max_new_tokens=5,
                                                        temperature=1.0, controls=True, n_controls=2, answer=" mat"))


def steer_cancelled(e, mp):
    with pytest.raises(Cancelled):
        request = steering.SteeringRequest(PROMPT, ((5, 3.0),), calibration="absolute", max_new_tokens=8)
        steering.steer_generate(e, request, cancel=CancelAfter(3))


def steer_sampler_crashes(e, mp):
    calls = {"n": 0}
    real = generation._sample

    def sample(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Boom("sampler")
        return real(*a)

    mp.setattr(generation, "_sample", sample)
    with pytest.raises(Boom):
        steering.steer_generate(e, steering.SteeringRequest(PROMPT, ((5, 3.0),), calibration="absolute",
                                                            max_new_tokens=8))


def ablate_ok(e, mp):
    ablation.ablate_and_test(e, PROMPT, " mat", [3, 7], position=[-1], controls=True, n_controls=2)


def ablate_hook_crashes(e, mp):
    def bad_hook(rows, positions, device):
        def hook(acts, hook):
            raise Boom("inside the spliced SAE")

        return hook

    mp.setattr(ablation, "_ablation_hook", bad_hook)
    with pytest.raises(Boom):
        ablation.ablate_and_test(e, PROMPT, " mat", [3])


def ablate_bad_position(e, mp):
    with pytest.raises(InvalidInput):
        ablation.ablate_and_test(e, PROMPT, " mat", [3], position=[99])


def attribute_ok(e, mp):
    attr.attribute(e, PROMPT, " mat", counterfactual=" park")


def attribute_backward_crashes(e, mp):
    real = torch.autograd.grad

    def grad(outputs, inputs, *a, **k):
        for leaf in inputs:  # a tensor hook that raises while the backward pass runs
            leaf.register_hook(lambda g: (_ for _ in ()).throw(Boom("mid-backward")))
        return real(outputs, inputs, *a, **k)

    mp.setattr(torch.autograd, "grad", grad)
    with pytest.raises(Boom):
        attr.attribute(e, PROMPT, " mat", counterfactual=" park")


CALLS = [steer_ok, steer_cancelled, steer_sampler_crashes, ablate_ok, ablate_hook_crashes, ablate_bad_position,
         attribute_ok, attribute_backward_crashes]


@pytest.mark.parametrize("engine_cleanup", [True, False], ids=["engine-cleanup", "context-managers-alone"])
def test_random_mix_of_failing_and_succeeding_calls_leaves_the_model_exactly_as_it_was(
    tiny_engine, monkeypatch, engine_cleanup
):
    e = tiny_engine
    if not engine_cleanup:  # our context managers alone must clean up, without device_work's safety net
        monkeypatch.setattr(type(e), "clean_model", lambda self: None)
    s = e.sae(None)
    tokens = e.to_tokens(PROMPT)
    with torch.inference_mode():
        before = e.model(tokens).clone()
    weights = {k: v.clone() for k, v in s.sae.state_dict().items()}
    error_term = s.sae.use_error_term

    sequence = CALLS + [random.Random(0).choice(CALLS) for _ in range(16)]
    random.Random(1).shuffle(sequence)
    for call in sequence:
        with pytest.MonkeyPatch.context() as mp:
            call(e, mp)
        assert e.is_clean(), f"hooks or SAEs left after {call.__name__}"
        assert not e.model.acts_to_saes and type(e.model.hook_dict[s.hook_name]).__name__ == "HookPoint"
        assert s.sae.use_error_term == error_term
        assert all(not p.requires_grad for p in e.model.parameters())
        assert all(torch.equal(v, weights[k]) for k, v in s.sae.state_dict().items()), call.__name__
        with torch.inference_mode():
            assert torch.equal(e.model(tokens), before), f"logits changed after {call.__name__}"
        # and a standalone encode is not ablated by a leftover hook on the SAE's own hook points
        with torch.inference_mode():
            x = e.forward_to_hook(tokens, s)
            assert torch.equal(e.encode(s, x), torch.relu(
                (x - s.sae.b_dec) @ s.sae.W_enc + s.sae.b_enc))
