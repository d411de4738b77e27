"""The library's own toolbox (floor 0): argument checks, atomic files, the safetensors reader, the
memory budget, huge-page buffers and torch/NumPy helpers. Private to qkv as a package (users do not
import it), public inside it: every qkv module may use these names. Imports no other qkv module."""
