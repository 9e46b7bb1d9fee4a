"""Where the Alembic scripts are, installed or in a checkout; imported only to migrate."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config


def script_location() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_alembic", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the archive's Alembic scripts are missing from this installation")


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config
