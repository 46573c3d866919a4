"""Image preprocessing for MedGemma in vLLM's API process: decoding (``decode``) and the
Gemma 3 image processor (``processor``), both cheaper than vLLM's defaults and both
checked against them (tests/unit/images/test_fidelity.py, docs/images.md)."""
