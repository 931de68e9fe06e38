"""mmehr: autoregressive EHR foundation models with multimodal inputs over MEDS data."""

__version__ = "0.1.0"
