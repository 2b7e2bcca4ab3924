"""OpenSpeed: PyTorch-native training for large multimodal models."""

__version__ = "0.1.0"


def from_pretrained(path, **kwargs):
    """Load a Hugging Face-format model directory into the native OpenSpeed model."""
    from openspeed.models.loading import from_pretrained as _from_pretrained

    return _from_pretrained(path, **kwargs)


__all__ = ["from_pretrained", "__version__"]
