"""Keeps TensorFlow (used only by the input pipeline) off the accelerators.

TF grabs all GPU memory (and can claim TPUs) as soon as it initialises its
devices; JAX must own them. Call this before the first tf.data use.
"""
from __future__ import annotations

import importlib.util

from absl import logging


def hide_accelerators_from_tensorflow() -> bool:
  """Hides GPUs/TPUs from TensorFlow; returns False if TF is not installed."""
  if importlib.util.find_spec('tensorflow') is None:
    return False
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError) as e:
      # RuntimeError: TF devices were already initialised (too late to hide).
      logging.warning('Could not hide %s devices from TensorFlow: %s', kind, e)
  return True
