"""Presets: named defaults for the compression options and the method (explicit options override them)."""

# Presets set defaults that explicit options override. "fast" is the spine's path; "quality" is the best
# combination of benchmarks/results_quality.md (issue 9), and the default of the CLI and `compactor.compress`.
PRESETS = {
    "fast": {"options": {"budget": "layer", "budget_floor": 0.75}, "method": {"score": "rms"}},
    "quality": {"options": {"budget": "split", "budget_floor": 0.75, "split_share": 0.25,
                            "sources": {"context": 0.25, "repeat": 0.75}},
                "method": {"score": "kvgrad", "value_fit": "check", "beta_ridge": 0.01}},
}

DEFAULT_PRESET = "quality"


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
