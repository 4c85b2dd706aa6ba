"""The real serving engine (vLLM's CPU build) beside the project: its install, a tiny local model, its servers."""
