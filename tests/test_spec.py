"""harness.spec: the spec's dataclasses (every field documented)."""

from __future__ import annotations

import ast

from conftest import ROOT


def test_every_spec_field_has_a_docstring():
    tree = ast.parse((ROOT / "harness" / "spec.py").read_text(encoding="utf-8"))
    missing, count = [], 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for i, stmt in enumerate(cls.body):
            if isinstance(stmt, ast.AnnAssign):
                count += 1
                nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
                if not (
                    isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and nxt.value.value.strip()
                ):
                    missing.append(f"{cls.name}.{stmt.target.id}")
    assert count > 50
    assert missing == []
