"""Jinja templates of hf_kd model cards, shipped as package data (`hf_kd.model_cards`) and rendered by
[`hf_kd.hub.generate_model_card`] through `importlib.resources`. This file only makes the folder importable."""
