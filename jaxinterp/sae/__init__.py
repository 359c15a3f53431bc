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
from jaxinterp.sae.splice import Splice
from jaxinterp.sae.stores import DiskStore, OnlineStore, fit_online, fused_step
from jaxinterp.sae.metrics import downstream_metrics, latent_acts, reconstruction_metrics
from jaxinterp.sae.board import board_reconstruction, coverage
from jaxinterp.sae.saelens import load_saelens, save_saelens

__all__ = [
    "FAMILIES", "SAE", "ReLUSAE", "PAnnealSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "Hparams",
    "get_family", "init_sae", "SAETrainConfig", "SAETrainer", "TrainState", "init_state", "sae_step", "unstack",
    "Splice", "OnlineStore", "DiskStore", "fused_step", "fit_online", "reconstruction_metrics", "downstream_metrics",
    "latent_acts", "coverage", "board_reconstruction", "save_saelens", "load_saelens",
]
