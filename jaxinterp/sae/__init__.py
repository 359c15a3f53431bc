"""Sparse autoencoders: families, training (vmapped grids), activation stores, metrics, splicing."""

from jaxinterp.sae.families import (
    FAMILIES,
    SAE,
    BatchTopKSAE,
    GatedSAE,
    Hparams,
    JumpReLUSAE,
    PAnnealSAE,
    ReLUSAE,
    TopKSAE,
    get_family,
    init_sae,
)
from jaxinterp.sae.train import SAETrainConfig, SAETrainer, TrainState, init_state, sae_step, unstack

__all__ = [
    "FAMILIES", "SAE", "ReLUSAE", "PAnnealSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "Hparams",
    "get_family", "init_sae", "SAETrainConfig", "SAETrainer", "TrainState", "init_state", "sae_step", "unstack",
]
