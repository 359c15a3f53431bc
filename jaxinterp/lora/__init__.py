"""LoRA adapters as a transform of a model's parameter pytree.

    from jaxinterp import lora
    lm = lora.init(model, lora.LoraConfig(rank=8, targets=("blocks.*.attn.*",), layers=(2, 3)))
    logits = lm.run(tokens).logits               # == model.run(tokens).logits at init (B = 0)
    trainable, frozen = lora.split(lm)           # optimise `trainable` only
    merged = lora.merge(lm)                      # plain Model with W + (alpha/r) A B
    lora.save_peft(lm, "out/adapter")            # PEFT's adapter_config.json + adapter_model.safetensors
"""

from jaxinterp.lora.core import (
    Lora,
    LoraConfig,
    LoraModel,
    combine,
    adapters,
    delta,
    effective_model,
    init,
    merge,
    run,
    split,
)
from jaxinterp.lora.peft_io import load_peft, save_peft
from jaxinterp.lora.targets import LoraTarget, projections, select_projections

__all__ = [
    "Lora", "LoraConfig", "LoraModel", "init", "split", "combine", "merge", "effective_model", "run", "delta",
    "save_peft", "load_peft", "LoraTarget", "projections", "select_projections", "adapters",
]
