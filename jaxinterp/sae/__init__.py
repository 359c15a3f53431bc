"""Sparse autoencoders: families, training (vmapped grids), activation stores, metrics, splicing,
SAEs from the public ecosystem (``load`` / ``save``: Gemma Scope, SAELens, dictionary_learning)."""

from jaxinterp.sae.families import (
    FAMILIES,
    SAE,
    BatchTopKSAE,
    GatedSAE,
    Hparams,
    JumpReLUSAE,
    PAnnealSAE,
    Reads,
    ReLUSAE,
    TopKSAE,
    get_family,
    init_sae,
    sae_from_params,
)
from jaxinterp.sae.train import SAETrainConfig, SAETrainer, TrainState, init_state, sae_step, unstack
from jaxinterp.sae.splice import Splice
from jaxinterp.sae.stores import DiskStore, OnlineStore, fit_online, fused_step
from jaxinterp.sae.metrics import downstream_metrics, latent_acts, reconstruction_metrics
from jaxinterp.sae.board import board_reconstruction, coverage
from jaxinterp.sae.io import FORMATS, TL_HOOKS, load, save

__all__ = [
    "FAMILIES", "SAE", "ReLUSAE", "PAnnealSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "GatedSAE", "Hparams",
    "get_family", "init_sae", "SAETrainConfig", "SAETrainer", "TrainState", "init_state", "sae_step", "unstack",
    "Splice", "OnlineStore", "DiskStore", "fused_step", "fit_online", "reconstruction_metrics", "downstream_metrics",
    "latent_acts", "coverage", "board_reconstruction", "Reads", "sae_from_params", "load", "save", "FORMATS",
    "TL_HOOKS",
]
