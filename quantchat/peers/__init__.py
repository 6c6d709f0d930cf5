"""Other inference engines run side by side with quantchat on the same model (optional dependencies)."""
