"""Flax Linen modules: the Qwen2 policy, the SPRM head, and the two on one backbone."""
