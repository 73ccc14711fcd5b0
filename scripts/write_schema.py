"""Regenerate the shipped JSON Schema of the config file."""

import json
from pathlib import Path

from edgequant.config.schema import json_schema

TARGET = Path(__file__).resolve().parents[1] / "src" / "edgequant" / "config" / "edgequant-config.schema.json"

if __name__ == "__main__":
    TARGET.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    print(TARGET)
