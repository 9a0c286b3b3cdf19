"""Development tools, not used by a serving engine: the tiny-model builder, the demo, a
test server launcher, the KV probe, and the plain-transformers reference of the spec."""
