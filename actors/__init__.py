"""fescale's actors: model backends (vLLM, Hugging Face, OpenAI-compatible) and the role pools that hold them."""
