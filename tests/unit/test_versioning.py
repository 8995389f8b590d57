"""Code versions of the stage caches: the whole of ``alignment/`` and the part one recipe runs."""

from __future__ import annotations

import shutil

import pytest

from tasks import versioning

ROOT = versioning.PACKAGE_ROOT


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of ``alignment/`` as the package root, so that a test can edit its sources."""
    shutil.copytree(ROOT / "alignment", tmp_path / "alignment", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(versioning, "PACKAGE_ROOT", tmp_path)
    return tmp_path / "alignment"


def version(recipe: str) -> str:
    return versioning.recipe_code_version.__wrapped__(recipe)  # uncached: the sources change under the test


def test_a_recipes_version_follows_the_code_it_imports_and_nothing_else(package_copy):
    reward, dpo = version("reward"), version("dpo")
    assert reward != dpo and version("reward") == reward  # per recipe, and stable
    # the GPU decode kernels: DPO imports them (its generation), the reward recipe never does
    (package_copy / "triton_attention.py").write_text((package_copy / "triton_attention.py").read_text() + "\n# x\n")
    assert version("reward") == reward and version("dpo") != dpo
    # code it runs: the entry point, modules the recipe imports, the package above them
    for name in ("train.py", "losses.py", "recipes/supervised.py", "__init__.py"):
        before = version("reward")
        (package_copy / name).write_text((package_copy / name).read_text() + "\n# changed\n")
        assert version("reward") != before, name


def test_relative_and_nested_imports_are_followed(tmp_path):
    (tmp_path / "alignment" / "sub").mkdir(parents=True)
    for name in ("alignment/__init__.py", "alignment/sub/__init__.py", "alignment/sub/a.py", "alignment/b.py"):
        (tmp_path / name).write_text("")
    source = tmp_path / "alignment" / "sub" / "mod.py"
    source.write_text("from . import a\nfrom ..b import thing\ndef f():\n    import alignment.c\n    import torch\n")
    names = versioning._imported("alignment.sub.mod", source)
    assert {"alignment.sub.a", "alignment.b", "alignment.b.thing", "alignment.c"} <= names
    assert not any(n.startswith("torch") for n in names)


def test_an_unknown_recipe_is_a_key_error():
    with pytest.raises(KeyError):
        versioning.recipe_code_version("nope")
