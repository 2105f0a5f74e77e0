"""lightrft_mm: multimodal-first reinforcement fine-tuning.

Importing the package is light: torch, transformers and optional backends are imported by the
modules that need them.
"""

__version__ = "0.1.0"
