"""Version numbers of what trainer_lib writes, importable without torch (Flyte's cache versions derive from them)."""

#: the checkpoint layout's version, written into every checkpoint and refused when it differs
FORMAT_VERSION = 1
