"""Training-history segments: a history is a list of immutable segment stores.

Adds ``training_history_segments`` (one row per segment store: where it is,
its position in the history and its row count), a unique ``key`` on
``training_history_refs`` and its ``meta`` JSON column (the user's metadata).
Appending a segment and updating the reference's row count and summary happen
in one transaction, so a crash leaves the history as it was before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_history_refs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("meta", sa.JSON(), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_training_history_refs_key"), ["key"])
    op.create_table(
        "training_history_segments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ref_id", sa.Integer(), nullable=False),
        sa.Column("store_url", sa.Text(), nullable=False),
        sa.Column("first_row", sa.BigInteger(), nullable=False),
        sa.Column("n_rows", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ref_id"], ["training_history_refs.id"],
            name=op.f("fk_training_history_segments_ref_id_training_history_refs"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_history_segments")),
        sa.UniqueConstraint("ref_id", "first_row", name=op.f("uq_training_history_segments_ref_id_first_row")),
    )


def downgrade() -> None:
    op.drop_table("training_history_segments")
    with op.batch_alter_table("training_history_refs", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_training_history_refs_key"), type_="unique")
        batch_op.drop_column("meta")
