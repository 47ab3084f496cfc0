"""Multi-row INSERT statements: many rows per statement, few distinct statements."""

from __future__ import annotations

import sqlite3
from typing import Any


class MultiRowInsert:
    """One INSERT statement per up to 256 rows: each statement releases the GIL once while
    SQLite works, instead of once per row. A few fixed sizes keep them in the statement cache."""

    SIZES = (256, 64, 16, 4, 1)

    def __init__(self, head: str, row: str):
        self.width = row.count("?")
        self.statements = [(rows * self.width, head + ",".join([row] * rows))
                           for rows in self.SIZES]

    def run(self, conn: sqlite3.Connection, params: list[Any]) -> None:
        """Insert the rows whose values follow each other in ``params``."""
        start = 0
        for width, statement in self.statements:
            while len(params) - start >= width:
                conn.execute(statement, params[start:start + width])
                start += width
