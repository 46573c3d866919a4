"""MedGemma-4b-it serving on vLLM: engine profiles, launcher, dev checkpoint."""

__version__ = "0.1.0"
