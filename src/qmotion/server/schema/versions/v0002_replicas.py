"""replicas: several managers on one database, each task owned by one of them; the web
console's sessions in the database (shared by the replicas, kept across restarts)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 (issue 26)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=256), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("holder", sa.String(length=64), nullable=True),
        sa.Column("holder_epoch", sa.Integer(), nullable=True),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("token_digest", sa.String(length=64), nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_console_sessions_last_seen", "console_sessions", ["last_seen"])
    # Tasks from before: no owner, so the first replica to start takes them (as a restart).
    # A database from before Alembic that lacked the tasks table got it from the models,
    # with these columns already.
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("tasks")}
    if "owner" not in have:
        with op.batch_alter_table("tasks") as batch_op:
            batch_op.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
            batch_op.add_column(sa.Column("owner_epoch", sa.Integer(), nullable=True))
            batch_op.create_index("ix_tasks_owner", ["owner"], unique=False)

    # "entering-maintenance" is 20 characters: SQLite ignores a VARCHAR's length (and would
    # copy the whole table to change it), PostgreSQL refuses the value.
    if op.get_bind().dialect.name != "sqlite":
        op.alter_column(
            "hosts", "state", type_=sa.String(length=32), existing_type=sa.String(length=16)
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch_op:
        batch_op.drop_index("ix_tasks_owner")
        batch_op.drop_column("owner_epoch")
        batch_op.drop_column("owner")
    op.drop_table("console_sessions")
    op.drop_table("leases")
    op.drop_table("replicas")
