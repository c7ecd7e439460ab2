"""webssl-repro: the reproducibility artifact for *Scaling Language-Free Visual
Representation Learning* (Fan, Tong et al., ICCV 2025)."""

__version__ = "0.1.0"
