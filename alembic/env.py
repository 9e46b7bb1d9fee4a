"""Alembic environment: runs on the connection the archive hands over (inside its own write
transaction, so a failed migration rolls back on SQLite too), or on `sqlalchemy.url`."""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import create_engine

from alembic import context

config = context.config
if config.config_file_name is not None:  # only when run from an alembic.ini
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        context.configure(connection=conn, target_metadata=None)
        with context.begin_transaction():
            context.run_migrations()


run()
