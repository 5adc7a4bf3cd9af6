"""Quantization-aware training: the callback, the one module that talks to torch.ao, the packed artifact."""
