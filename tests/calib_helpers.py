"""A valid calibration file for a model without running calibration: codebooks fitted to Laplace-like coordinates
(clearly not the Beta codebook), allocations that differ per layer and phase, non-uniform head weights. For tests of
how compress uses a calibration, of the file's validation, and of the corruption test's phased base."""
from __future__ import annotations

import numpy as np
import torch

from compactor.capture.phases import FALLBACK_FRACTION, MARKERS, PHASE_NAMES
from compactor.models import config_fingerprint, tokenizer_fingerprint, weights_identity
from compactor.quant import empirical_codebook
from compactor.storage.calibration_file import write_calibration

CODEBOOK_BITS = [2, 3, 4]
AVG_BITS = [3.0, 4.0]
OPTIONS = [2, 3, 4, 5, 6, 8]


def synthetic_arrays(L: int, H: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    P, S = len(PHASE_NAMES), len(PHASE_NAMES) + 1
    arrays = {"rho": (torch.rand(2, 2, S, L, H, generator=g) * 0.5).numpy().astype(np.float32),
              "codebook_mse": (torch.rand(L, 2, len(CODEBOOK_BITS), 3, generator=g) * 1e-3).numpy()
              .astype(np.float32),
              "phase_codebook_used": np.zeros((P, L, 2, len(CODEBOOK_BITS)), np.uint8),
              "head_weights": (0.2 + 2 * torch.rand(L, H, generator=g)).numpy().astype(np.float32),
              "head_d_ckl": torch.rand(L, H, generator=g).numpy().astype(np.float32),
              "head_d_ret": torch.rand(L, H, generator=g).numpy().astype(np.float32)}
    arrays["phase_codebook_used"][1, 0, 0, :] = 1  # think phase, layer 0, keys: its own codebook
    for t in ("keys", "values"):
        for b in CODEBOOK_BITS:
            books = []
            for i in range(L * (1 + P)):
                x = torch.distributions.Laplace(0.0, 1.0).sample((3000,)) / (8 + i % 5)
                books.append(empirical_codebook(x.clamp(-0.99, 0.99), b, seed=i).centroids.numpy())
            books = np.stack(books).astype(np.float32)
            arrays[f"codebook_{t}_b{b}"] = books[:L]
            arrays[f"phase_codebook_{t}_b{b}"] = books[L:].reshape(P, L, -1)
    doc = np.zeros((len(AVG_BITS), L, 2), np.uint8)
    ph = np.zeros((len(AVG_BITS), L, P, 2), np.uint8)
    for i, a in enumerate(AVG_BITS):
        a = int(a)
        doc[i] = a
        doc[i, 0, 0], doc[i, -1, 0] = a + 1, a - 1  # layer 0 keys one bit more, last layer's keys one less
        ph[i] = a
        ph[i, :, 1] = a - 1  # think one bit less, answer one more
        ph[i, :, 2] = a + 1
    arrays.update({"bits_document": doc, "bits_phases": ph})
    return arrays


def write_synthetic_calibration(path, lm, defaults: dict | None = None, seed: int = 0, **meta_changes):
    cfg = lm.model.config
    L, H = int(cfg.num_hidden_layers), int(cfg.num_key_value_heads)
    meta = {
        "compactor_version": "0.1.0", "created": "2026-11-23T00:00:00+00:00", "model_id": lm.model_id,
        "model_type": cfg.model_type, "model_config_sha256": config_fingerprint(cfg),
        "model_weights": weights_identity(lm.model), "tokenizer_sha256": tokenizer_fingerprint(lm.tokenizer),
        "num_layers": L, "num_kv_heads": H, "head_dim": int(lm.model.model.layers[0].self_attn.head_dim),
        "phases": {"names": list(PHASE_NAMES), "markers": [list(m) for m in MARKERS],
                   "fallback_fraction": FALLBACK_FRACTION},
        "codebooks": {"bits": CODEBOOK_BITS, "phase_gain": 0.05},
        "allocation": {"avg_bits": AVG_BITS, "bit_options": OPTIONS},
        "head_budgets": {"ratio": 10.0, "shrink": 0.5, "unit": "head"},
        "defaults": defaults or {"codebooks": True, "layer_bits": True, "phase_bits": True, "head_budgets": True,
                                 "budget": "global"},
        "settings": {}, "summary": {},
    }
    meta.update(meta_changes)
    return write_calibration(path, meta, synthetic_arrays(L, H, seed))
