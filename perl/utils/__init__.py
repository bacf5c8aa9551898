"""Small process-level helpers (TensorFlow set-up, ...)."""
