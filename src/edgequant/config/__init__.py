"""Config files in the layout SpacemiT XQuant users write (JSON or YAML)."""

from edgequant.config.schema import ConfigFile, ResolvedConfig, json_schema, load_config

__all__ = ["ConfigFile", "ResolvedConfig", "json_schema", "load_config"]
