"""Native compute kernels (built on first use); see ``quantchat.kernels.cpu``."""
