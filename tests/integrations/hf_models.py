"""Small random-weight configs of the transformers families qkv's integration is checked against."""

from __future__ import annotations

import transformers as tf

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL))


def _mistral():
    return tf.MistralForCausalLM(tf.MistralConfig(**SMALL, sliding_window=7))


def _qwen2():
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**SMALL, use_sliding_window=False))


def _qwen3():
    return tf.Qwen3ForCausalLM(tf.Qwen3Config(**SMALL, head_dim=16))


def _gemma2():
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(**SMALL, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                                final_logit_softcapping=30.0, query_pre_attn_scalar=16))


def _gemma3():
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=6,
                                                    layer_types=["sliding_attention", "full_attention"]))


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256))


def _gpt_oss():
    cfg = tf.GptOssConfig(**{**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
                             "head_dim": 16, "layer_types": ["sliding_attention", "full_attention"]})
    return tf.GptOssForCausalLM(cfg)


def _phi3():
    return tf.Phi3ForCausalLM(tf.Phi3Config(**{**SMALL, "pad_token_id": 0}))


def _bert():
    return tf.BertModel(tf.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=96), add_pooling_layer=False)


def _modernbert():
    return tf.ModernBertModel(tf.ModernBertConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                                  num_hidden_layers=3, num_attention_heads=4, local_attention=8,
                                                  global_attn_every_n_layers=2, pad_token_id=0))


def _vit():
    return tf.ViTModel(tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                    image_size=32, patch_size=8), add_pooling_layer=False)


def _t5():
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=96, num_layers=2,
                                                     num_heads=4, decoder_start_token_id=0))


def _whisper():
    cfg = tf.WhisperConfig(vocab_size=97, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, num_mel_bins=16,
                           max_source_positions=32, max_target_positions=64, decoder_start_token_id=1,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, suppress_tokens=None,
                           begin_suppress_tokens=None)
    return tf.WhisperForConditionalGeneration(cfg)


#: name -> (builder, kind): kind is "causal" (decoder LM), "encoder" (token encoder), "image", "seq2seq"
FAMILIES = {
    "llama": (_llama, "causal"), "mistral": (_mistral, "causal"), "qwen2": (_qwen2, "causal"),
    "qwen3": (_qwen3, "causal"), "gemma2": (_gemma2, "causal"), "gemma3": (_gemma3, "causal"),
    "gpt2": (_gpt2, "causal"), "gpt_oss": (_gpt_oss, "causal"), "phi3": (_phi3, "causal"),
    "bert": (_bert, "encoder"), "modernbert": (_modernbert, "encoder"), "vit": (_vit, "image"),
    "t5": (_t5, "seq2seq"), "whisper": (_whisper, "seq2seq"),
}
