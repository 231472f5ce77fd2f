"""The flytrain pipeline (prepare -> train -> evaluate) and its Flyte and DVC entry points."""
