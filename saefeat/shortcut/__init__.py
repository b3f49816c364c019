"""Shortcut features: detect them with SAE latents, and train them away with divergence-based regularization.

- `data`: CAD / FEVER-Symmetric / MNLI-HANS / QQP-PAWS loaders with pairing and label checks.
- `attribution`: the bias-only model and Integrated Gradients (DBR's shortcut tokens).
- `detect`: shortcut latents (counterfactual invariance, token-label PMI) and where they fire.
- `masking`: masked copies x̃ (hard and soft masking).
- `jsd`, `dbr`: the JSD penalty and the DBR trainers (`head` on frozen features, `finetune` of the encoder).
- `selection`, `experiment`: the DBR experiment: masked copies, a trainer per mode, L2 and λ chosen on in-domain
  data only, and the evaluation (accuracy, gap, reliance).
"""

from __future__ import annotations

_EXPORTS = {
    "load_benchmark": "saefeat.shortcut.data",
    "Benchmark": "saefeat.shortcut.data",
    "TextDataset": "saefeat.shortcut.data",
    "PairedDataset": "saefeat.shortcut.data",
    "DatasetUnavailable": "saefeat.shortcut.data",
    "BiasOnlyModel": "saefeat.shortcut.attribution",
    "ShortcutDetector": "saefeat.shortcut.detect",
    "latent_positions": "saefeat.shortcut.detect",
    "mask_texts": "saefeat.shortcut.masking",
    "jsd": "saefeat.shortcut.jsd",
    "DBRClassifier": "saefeat.shortcut.dbr",
    "DBRFineTuner": "saefeat.shortcut.dbr",
    "HeadTrainer": "saefeat.shortcut.experiment",
    "FineTuneTrainer": "saefeat.shortcut.experiment",
    "select_and_fit": "saefeat.shortcut.experiment",
    "evaluate": "saefeat.shortcut.experiment",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saefeat.shortcut' has no attribute {name!r}")
