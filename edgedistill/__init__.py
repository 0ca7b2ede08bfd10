"""edgedistill: distill a big image classifier into a small edge model with Energy KD.

Method: Kim et al., "Maximizing Discrimination Capability of Knowledge Distillation with
Energy Function", Knowledge-Based Systems 296 (2024) 111911.
"""

__version__ = "0.1.0"
