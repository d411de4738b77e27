"""qkv inside other libraries' models.

- `qkv.integrations.transformers`: importing it registers qkv as the Hugging Face
  `attn_implementation="qkv"` (attention and mask functions both).

Nothing here is imported by `import qkv`; each integration imports its library itself.
"""
