"""Pure V2Drop: no vLLM import, usable in every process and without vLLM."""
