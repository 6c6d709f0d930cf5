"""The OpenAI-compatible API: protocol models, the shared stream helper, chat and completions, the app."""
