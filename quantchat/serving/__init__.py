"""Serving: the OpenAI-compatible API, workers with continuous batching, the controller, the web page."""
