"""Lenses: decode every layer's residual stream into next-token predictions.

    logits = ji.lens.logit_lens(model, tokens)                 # [L, B, T, V]
    kl = ji.lens.kl_to_final(logits, model.run(tokens).logits)  # [L, B, T]

``logit_lens`` reuses the model's own final norm and unembedding; a ``TunedLens`` learns one affine
translator per layer first (Belrose et al., 2023).
"""

from jaxinterp.lens.logit import apply_head, capture_residuals, kl_to_final, logit_lens, residual_sites
from jaxinterp.lens.tuned import TunedLens, TunedLensConfig, train_tuned_lens

__all__ = ["logit_lens", "kl_to_final", "residual_sites", "capture_residuals", "apply_head", "TunedLens",
           "TunedLensConfig", "train_tuned_lens"]
