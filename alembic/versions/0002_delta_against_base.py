"""Contents may be compressed against their base (codec 3, zstd with the base as dictionary).

No table changes: the revision exists so that a version of archive that cannot read codec 3
refuses this archive as newer than itself, instead of failing at the first such delta.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    raise NotImplementedError("an archive's history is not downgraded")
