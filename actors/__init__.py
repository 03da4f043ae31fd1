"""fescale's runtime (knows no config): model backends (vLLM, Hugging Face, OpenAI-compatible), model replicas and their clients, the error hierarchy."""
