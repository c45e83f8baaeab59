"""harness: one YAML run spec to a validated DeepSpeed config, a trained HF model, and a launch."""

__version__ = "0.1.0"
