"""Models built from `qkv.layers`: decoders (GPT-2 / Llama / Mistral style) and checkpoint import.

    from qkv.models import Decoder, DecoderConfig
    model = Decoder(DecoderConfig.llama(n_layers=2))
    model = qkv.models.hf.load("path/to/hf-checkpoint")      # config.json + *.safetensors
"""

from qkv.models.config import DecoderConfig
from qkv.models.decoder import Decoder

__all__ = ["Decoder", "DecoderConfig", "hf"]


def __getattr__(name):
    if name == "hf":
        import importlib

        module = importlib.import_module("qkv.models.hf")
        globals()["hf"] = module
        return module
    raise AttributeError(f"module 'qkv.models' has no attribute {name!r}")
