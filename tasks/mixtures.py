"""Mixtures across datasets. Rates are relative sampling weights; every member
shares the gin-chosen task vocabulary (synthetic tasks use bytes and are not
mixed with upstream data)."""
from __future__ import annotations

from tasks import common, hh_rlhf

MIXTURES = {
    # All four HH subsets, weighted roughly by their train sizes (thousands).
    "hh_rlhf_preference": [
        (hh_rlhf.task_name("harmless-base", "preference"), 42.5),
        (hh_rlhf.task_name("helpful-base", "preference"), 43.8),
        (hh_rlhf.task_name("helpful-online", "preference"), 22.0),
        (hh_rlhf.task_name("helpful-rejection-sampled", "preference"), 52.4),
    ],
    # Reward-model pairs from every preference dataset, equally weighted.
    "preference_all": [
        ("tldr_preference", 1.0), ("hh_rlhf_preference", 1.0),
        ("shp_preference", 1.0),
    ],
    # Pointwise reward sets released with PERL.
    "taskmaster_pointwise": [("taskmaster4_pointwise", 1.0),
                             ("taskmaster3_pointwise", 1.0)],
    "taskmaster_sft": [("taskmaster4_sft", 1.0), ("taskmaster3_sft", 1.0)],
    # Summarisation prompts for RL.
    "summarization_prompts": [("tldr_prompts", 1.0), ("bolt_prompts", 1.0)],
}


def register() -> None:
  for name, members in MIXTURES.items():
    common.register_mixture(name, members)
