"""Initial schema: documents, their names, content-addressed contents, immutable events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# The database itself refuses to change history. On SQLite, BEFORE UPDATE/DELETE triggers do
# not fire for INSERT OR REPLACE, so a BEFORE INSERT trigger refuses a clashing position or
# content id too. On PostgreSQL a row trigger does not cover TRUNCATE: a statement trigger does.
SQLITE_TRIGGERS = [
    """CREATE TRIGGER {t}_no_update BEFORE UPDATE ON {t}
       BEGIN SELECT RAISE(ABORT, '{t} are immutable'); END""",
    """CREATE TRIGGER {t}_no_delete BEFORE DELETE ON {t}
       BEGIN SELECT RAISE(ABORT, '{t} are immutable'); END""",
    """CREATE TRIGGER {t}_no_replace BEFORE INSERT ON {t}
       WHEN EXISTS (SELECT 1 FROM {t} WHERE {pk} = NEW.{pk})
       BEGIN SELECT RAISE(ABORT, '{t} are immutable'); END""",
]
POSTGRES_FUNCTION = """
CREATE FUNCTION archive_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% are immutable', TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$
"""
POSTGRES_TRIGGERS = [
    """CREATE TRIGGER {t}_no_update_delete BEFORE UPDATE OR DELETE ON {t}
       FOR EACH ROW EXECUTE FUNCTION archive_immutable()""",
    """CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t}
       FOR EACH STATEMENT EXECUTE FUNCTION archive_immutable()""",
]
IMMUTABLE = {"events": "position", "contents": "id"}


def create_immutability_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(POSTGRES_FUNCTION)
        templates = POSTGRES_TRIGGERS
    else:
        templates = SQLITE_TRIGGERS
    for table, pk in IMMUTABLE.items():
        for template in templates:
            op.execute(template.format(t=table, pk=pk))


def upgrade() -> None:
    op.create_table(
        "contents",
        sa.Column("id", Id, primary_key=True, autoincrement=False),
        sa.Column("sha256", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("base_id", Id, sa.ForeignKey("contents.id")),
        sa.Column("depth", sa.SmallInteger, nullable=False),
        sa.Column("codec", sa.SmallInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "documents",
        sa.Column("id", Id, primary_key=True, autoincrement=False),
        sa.Column("key", sa.Text, unique=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("head_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("eff_at", sa.BigInteger, nullable=False),
        sa.Column("content_id", Id, sa.ForeignKey("contents.id")),
    )
    op.create_table(
        "doc_names",
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("doc_id", Id, sa.ForeignKey("documents.id"), nullable=False),
        sa.PrimaryKeyConstraint("key", "doc_id"),
    )
    op.create_table(
        "events",
        sa.Column("position", Id, primary_key=True, autoincrement=False),
        sa.Column("doc_id", Id, sa.ForeignKey("documents.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("type", sa.SmallInteger, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("content_id", Id, sa.ForeignKey("contents.id")),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.BigInteger, nullable=False),
        sa.Column("effective_at", sa.BigInteger, nullable=False),
        sa.Column("meta", sa.Text),
        sa.Column("event_hash", sa.LargeBinary(32), nullable=False),
        sa.UniqueConstraint("doc_id", "seq", name="uq_events_doc_seq"),
    )
    op.create_index("ix_events_doc_time", "events", ["doc_id", "effective_at", "seq"])
    create_immutability_triggers()


def downgrade() -> None:
    raise NotImplementedError("an archive's history is not downgraded")
