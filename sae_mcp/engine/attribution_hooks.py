"""The hooks that splice an SAE into the model for a backward pass (engine/attribution.py attribute, circuits/graph.py
trace_circuit): every SAE is spliced in WITH the error term, so the forward pass gives the plain model's logits.
Hooks (inside context managers), one SaeCapture per SAE:

  <hook>.hook_sae_input      keeps x, the SAE's input (in the autograd graph when an earlier SAE made it so)
  <hook>.hook_sae_acts_post  acts -> a leaf that requires grad: attribution = acts * d metric / d acts
  <hook>.hook_sae_error      err  -> a leaf e plus (x - x.detach()) (exactly 0): d metric / d e is the gradient
                             at the hook, and the gradient reaches x through the identity

Why the identity: sae-lens computes the error under torch.no_grad(), which would leave upstream SAEs a gradient
through this SAE's encoder/decoder only, so an upstream feature's attribution would change with which downstream
SAEs are loaded. With the identity path every node sees the plain model's gradient, and each SAE's attributions
are the same alone or together (tested).
"""

from __future__ import annotations

import torch

from sae_mcp.engine.runtime import FwdHooks
from sae_mcp.engine.saes import LoadedSAE


class SaeCapture:
    """One SAE's hooks for the attribution pass, and what they capture: x (its input), the activations as a leaf
    that requires grad, the error as a leaf with an identity path to x, and the output."""

    # Kept by the hooks during the forward (read after it):
    x: torch.Tensor  # [1, S, d_in] (flattened at hook_z)
    acts: torch.Tensor  # [1, S, d_sae], a leaf
    err: torch.Tensor  # [1, S, d_in] or [1, S, n_heads, d_head], a leaf
    out: torch.Tensor  # x_hat + err, the value that flows on (detached)

    def __init__(self, sae: LoadedSAE):
        self.sae = sae

    def fwd_hooks(self) -> FwdHooks:
        h = self.sae.hook_name
        return [
            (f"{h}.hook_sae_input", self._keep_input),
            (f"{h}.hook_sae_acts_post", self._leaf_acts),
            (f"{h}.hook_sae_error", self._leaf_error),
            (f"{h}.hook_sae_output", self._keep_output),
        ]

    def _keep_input(self, x: torch.Tensor, hook) -> torch.Tensor:
        self.x = x
        return x

    def _leaf_acts(self, acts: torch.Tensor, hook) -> torch.Tensor:
        self.acts = acts.detach().requires_grad_(True)
        return self.acts

    def _leaf_error(self, err: torch.Tensor, hook) -> torch.Tensor:
        # called under sae-lens' torch.no_grad(); re-enable to build the identity path to x
        with torch.enable_grad():
            self.err = err.detach().requires_grad_(True)
            x = self.x
            return self.err + (x - x.detach()).reshape(self.err.shape)

    def _keep_output(self, out: torch.Tensor, hook) -> torch.Tensor:
        self.out = out.detach()
        return out
