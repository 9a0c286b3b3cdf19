"""Worker side of V2Drop (the processes that run the model): the drop loop and the KV audit.
The runner seam (:mod:`vllm_v2drop.seams.runner`) feeds them each step."""
