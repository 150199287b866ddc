"""daro-lab: the loss scale issue of GRPO-family losses, DARO, and the tools to study them."""

__version__ = "0.1.0"
