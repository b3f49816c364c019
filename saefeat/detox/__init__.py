"""Toxicity filters on SAE features and SAE-based detoxifying steering of a causal LM (arXiv 2505.14536)."""

from saefeat.detox.baselines import bad_words_ids, toxic_words
from saefeat.detox.filter import ToxicityFilter, choose_threshold
from saefeat.detox.generation import Generations, generate
from saefeat.detox.latents import find_toxic_latents, latent_scores, rank_toxic_latents
from saefeat.detox.steering import SAELatentClamp, VectorSteering, steer
from saefeat.detox.vectors import diff_in_means, sdcv, ssv

__all__ = ["Generations", "SAELatentClamp", "ToxicityFilter", "VectorSteering", "bad_words_ids", "choose_threshold",
           "diff_in_means", "find_toxic_latents", "generate", "latent_scores", "rank_toxic_latents", "sdcv", "ssv",
           "steer", "toxic_words"]
