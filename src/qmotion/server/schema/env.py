"""Alembic's entry point for the manager's schema: runs on the connection the caller gives."""

from __future__ import annotations

from alembic import context

# The caller (schema.upgrade) passes an open connection and the models' metadata (for
# `alembic revision --autogenerate`): no URL, no ini file, no logging setup.
connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=context.config.attributes.get("metadata"),
    # SQLite alters a table by copying it; the batch mode does that for ALTERs it lacks.
    render_as_batch=True,
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
