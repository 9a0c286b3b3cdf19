"""The pure core: V2Drop's rules with no engine (no vLLM import).

Counts and plans are NumPy on the host, so the API server, the scheduler and the worker
compute them alike; scores and the segmented top-k are torch on the device.
"""
