"""Engine-core side of V2Drop (the process that runs vLLM's scheduler): request plans for the KV
cache, the per-stage KV layout, the whole-item rule. Plain objects in, plain answers out; the
seams (:mod:`vllm_v2drop.seams`) call it from vLLM's scheduler and KV-cache manager."""
