"""Model integrations, kept apart from the core ops: `ropefast.integrations.transformers`
puts HF transformers' Llama-family models on ropefast (imported on demand: transformers is
not a dependency of ropefast)."""
