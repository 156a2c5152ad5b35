"""`kernels` is also the name of a Hugging Face hub package: ours must win the import, stay empty
at the top, and not make transformers believe the hub package is installed."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

import kernels

REPO = Path(__file__).resolve().parents[2]


def test_import_kernels_gives_this_repository_package():
    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


def test_kernels_init_defines_nothing_beyond_its_docstring():
    tree = ast.parse((REPO / "kernels" / "__init__.py").read_text())
    assert ast.get_docstring(tree)
    assert len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr)
    assert not [name for name in vars(kernels) if not name.startswith("__")
                and not getattr(getattr(kernels, name), "__name__", "").startswith("kernels.")]


def test_transformers_does_not_take_ours_for_the_hub_package():
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_transformers_loads_and_runs_a_model_with_ours_imported(hf_models):
    import kernels.attention  # noqa: F401  (ours, fully imported)

    model = hf_models("qwen3")
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 512) and torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0
