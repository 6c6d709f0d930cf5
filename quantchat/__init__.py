"""quantchat: a secure, fast chatbot system for low-bit quantized LLMs."""

__version__ = "0.1.0"
