"""Typed recipes: YAML validated into method config dataclasses (defaults < YAML < CLI)."""

from bdscan.config.recipe import config_from_mapping, describe_config, load_recipe, parse_overrides

__all__ = ["config_from_mapping", "describe_config", "load_recipe", "parse_overrides"]
