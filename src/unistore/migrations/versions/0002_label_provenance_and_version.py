"""Label provenance and version: where each label came from and how often it changed.

Adds ``labels.provenance`` and ``labels.version`` to a table that already holds
rows.  Existing labels of datasets imported from the legacy SQLite layout get
provenance ``legacy-import``; all others ``unknown``; every existing label is
version 1.  The columns are then made NOT NULL (batch mode: SQLite copies the
table).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEGACY_KIND = "cluster_labeled_legacy"


def upgrade() -> None:
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provenance", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("version", sa.Integer(), nullable=True))

    op.execute(
        sa.text(
            "UPDATE labels SET version = 1, provenance = CASE WHEN sample_pk IN ("
            " SELECT samples.id FROM samples JOIN datasets ON samples.dataset_id = datasets.id"
            " WHERE datasets.kind = :legacy) THEN 'legacy-import' ELSE 'unknown' END"
        ).bindparams(legacy=LEGACY_KIND)
    )

    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.alter_column("provenance", existing_type=sa.String(length=64), nullable=False,
                              server_default="unknown")
        batch_op.alter_column("version", existing_type=sa.Integer(), nullable=False, server_default="1")


def downgrade() -> None:
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_column("version")
        batch_op.drop_column("provenance")
