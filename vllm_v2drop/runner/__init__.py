"""Runner adapters: read a step off vLLM's model runner and install per-stage attention metadata."""
