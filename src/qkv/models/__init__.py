"""Models built from `qkv.layers`: decoders (GPT-2 / Llama / Mistral style), a BERT-style
encoder, the original encoder-decoder Transformer, a Vision Transformer, and checkpoint import.

    from qkv.models import Decoder, DecoderConfig, Encoder, EncoderConfig
    model = Decoder(DecoderConfig.llama(n_layers=2))
    encoder = Encoder(EncoderConfig.bert(n_layers=2))
    seq2seq = Seq2Seq(Seq2SeqConfig(vocab_size=23))
    vit = ViT(ViTConfig(image_size=8, patch_size=2, channels=1, d_model=64, n_layers=4, n_heads=4, num_classes=10))
    model = qkv.models.hf.load("path/to/hf-checkpoint")      # config.json + *.safetensors
"""

from qkv.models.attention_only import AttentionOnly
from qkv.models.config import DecoderConfig
from qkv.models.decoder import Decoder
from qkv.models.encoder import Encoder, EncoderConfig, EncoderOutput
from qkv.models.seq2seq import Seq2Seq, Seq2SeqConfig
from qkv.models.vit import ViT, ViTConfig

__all__ = ["AttentionOnly", "Decoder", "DecoderConfig", "Encoder", "EncoderConfig", "EncoderOutput", "Seq2Seq", "Seq2SeqConfig", "ViT",
           "ViTConfig", "hf"]


def __getattr__(name):
    if name == "hf":
        import importlib

        module = importlib.import_module("qkv.models.hf")
        globals()["hf"] = module
        return module
    raise AttributeError(f"module 'qkv.models' has no attribute {name!r}")
