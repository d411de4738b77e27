"""The engines of the `qkv` commands: tools stand on the library, and nothing in the library imports them.

- `harness`: what every measuring tool shares (the machine, timing, tables, results on disk);
- `explain`: `qkv explain`, attention on a sentence step by step;
- `demo`: `qkv demo`, the tour (also `qkv.demo`);
- `selftest`: `qkv selftest`, the differential fuzzer against the float64 oracle;
- `bench`: one module per `qkv bench` target (backends, attention, generate, train, embed, approx).

Only `qkv.cli` imports them (lazily, per command).
"""
