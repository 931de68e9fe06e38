"""The model: GPT-2 decoder (`decoder`, `gpt`), compression (`compression`), gated cross-attention
(`fusion`), their configuration (`config`) and FLOP/parameter accounting (`accounting`).

This package imports nothing of mmehr but `mmehr.batch`, the batch contract."""
