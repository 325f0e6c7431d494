"""cimd-pipeline: ambiguous medical image segmentation with diffusion models (CIMD) in Kedro."""

__version__ = "0.1.0"
