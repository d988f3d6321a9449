"""The documentation's promises: every public name has a docstring, nothing refers to a file
the repository does not have, the site builds without a warning, the guides' code is valid
and runs, and the package, the examples and the typing checks pass mypy.

The site and the type check need the `docs` extra (sphinx, myst-parser, furo, mypy): without
it those tests skip, but fail instead when PYDIST_REQUIRE_DOCS=1 (CI's Python 3.11 pass
installs the extra and sets it; the other passes run the README's test command). Guide
blocks that say `# needs: joblib` or `# needs: sklearn` on their second line, and the check
of `pydist.joblib`'s docstrings, need the `sklearn` extra in the same way, with
PYDIST_REQUIRE_EXTRAS=1 (set by the same CI pass).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

import pydist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
GUIDES = os.path.join(DOCS, "guides")


def require(module: str) -> None:
    """Skip without `module`, or fail when CI requires the documentation tools."""
    if importlib.util.find_spec(module) is not None:
        return
    msg = f"{module} is not installed (pip install -e '.[docs]')"
    if os.environ.get("PYDIST_REQUIRE_DOCS") == "1":
        pytest.fail(msg + "; PYDIST_REQUIRE_DOCS=1 requires it")
    pytest.skip(msg)


# What a guide block's "# needs: NAME" line names -> the module that must be importable.
EXTRAS = {"joblib": "joblib", "sklearn": "sklearn"}


def require_extra(module: str) -> None:
    """Skip without `module` (an optional extra), or fail when CI requires the extras."""
    if importlib.util.find_spec(module) is not None:
        return
    msg = f"{module} is not installed (pip install -e '.[sklearn]')"
    if os.environ.get("PYDIST_REQUIRE_EXTRAS") == "1":
        pytest.fail(msg + "; PYDIST_REQUIRE_EXTRAS=1 requires it")
    pytest.skip(msg)


def _has_doc(obj: object) -> bool:
    return bool((inspect.getdoc(obj) or "").strip())


def _own_doc(obj: object) -> bool:
    """A docstring of its own: not the one `inspect.getdoc` inherits from a base class."""
    return bool((getattr(obj, "__doc__", None) or "").strip())


def public_members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties `cls` defines (inherited ones are checked on their
    base, which is public too)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            out.append((name, value))
    return out


def undocumented() -> list[str]:
    missing = []
    for name in pydist.__all__:
        obj = getattr(pydist, name)
        # pydist's own classes need a docstring of their own; a re-export (ExceptionGroup,
        # the builtin or its backport) keeps the one it has.
        own = inspect.isclass(obj) and obj.__module__.startswith("pydist")
        if not (_own_doc(obj) if own else _has_doc(obj)):
            missing.append(name)
        if inspect.isclass(obj) and obj.__module__.startswith("pydist"):
            for attr, member in public_members(obj):
                # An override documented on its base says the same thing: the base's
                # docstring is the contract (ClusterManager.launch for LocalManager.launch).
                if not _has_doc(member) and not any(
                        _has_doc(getattr(base, attr, None)) for base in obj.__mro__[1:]):
                    missing.append(f"{name}.{attr}")
    return missing


def test_every_public_name_and_method_has_a_docstring():
    assert undocumented() == []


def test_the_joblib_backend_module_is_documented():
    """pydist.joblib is not in pydist.__all__ (it needs joblib): its own public names are
    held to the same promises, docstrings and a place in the reference."""
    require_extra("joblib")
    import pydist.joblib as pj

    missing = [n for n in pj.__all__ if n != "BACKEND_NAME" and not _has_doc(getattr(pj, n))]
    missing += [f"PydistBackend.{n}" for n, m in public_members(pj.PydistBackend)
                if not _has_doc(m)]
    assert missing == []
    with open(os.path.join(DOCS, "api.md")) as f:
        text = f.read()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: pydist\.joblib\.(\w+)", text, re.M))
    assert sorted(set(pj.__all__) - documented) == []


def test_every_public_name_is_in_the_api_reference():
    with open(os.path.join(DOCS, "api.md")) as f:
        text = f.read()
    documented = set(re.findall(r"^\.\. (?:auto\w+|py:\w+):: pydist\.(\w+)", text, re.M))
    documented |= set(re.findall(r"^```\{(?:auto\w+|py:\w+)\} pydist\.(\w+)", text, re.M))
    assert sorted(set(pydist.__all__) - documented) == []


def _repo_text_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a checkout (an sdist): walk the tree instead
        files = [os.path.relpath(os.path.join(d, f), ROOT)
                 for d, _, fs in os.walk(ROOT) for f in fs]
    else:
        files = out.stdout.split()
    return [f for f in files if f.endswith((".py", ".md", ".toml", ".txt", ".cfg"))
            and not f.startswith(("bench/", ".")) and os.path.isfile(os.path.join(ROOT, f))]


def test_no_file_refers_to_a_document_the_repository_lacks():
    here = os.path.relpath(__file__, ROOT)
    offenders = []
    for rel in _repo_text_files():
        if rel == here:
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            if "API.md" in f.read():
                offenders.append(rel)
    assert offenders == [], "these mention API.md, which is not in the repository"


def test_public_signatures_name_their_keywords():
    """addprocs documents its keywords: each overload spells them out."""
    if sys.version_info < (3, 11):
        pytest.skip("typing.get_overloads is 3.11+")
    from typing import get_overloads

    kws = set()
    for sig in map(inspect.signature, get_overloads(pydist.addprocs)):
        kws |= {n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    for kw in ("exename", "exeflags", "dir", "env", "topology", "lazy", "timeout",
               "heartbeat_timeout", "restrict", "tunnel", "multiplex", "sshflags",
               "max_parallel", "shell", "ssh", "cmdline_cookie"):
        assert kw in kws


# ---------------------------------------------------------------- the site
@pytest.mark.timeout(300)
def test_docs_build_without_warnings(tmp_path):
    require("sphinx")
    require("myst_parser")
    require("furo")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         DOCS, str(tmp_path / "html")],
        capture_output=True, text=True, env=env, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "html" / "api.html").exists()
    for guide in os.listdir(GUIDES):
        assert (tmp_path / "html" / "guides" / guide.replace(".md", ".html")).exists()


# ---------------------------------------------------------------- the guides' code
FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def guide_blocks() -> list[tuple[str, int, str]]:
    blocks: list[tuple[str, int, str]] = []
    if not os.path.isdir(GUIDES):
        return blocks
    for name in sorted(os.listdir(GUIDES)):
        with open(os.path.join(GUIDES, name)) as f:
            text = f.read()
        for i, m in enumerate(FENCE.finditer(text)):
            blocks.append((name, i, m.group(1)))
    return blocks


def test_guides_have_code():
    names = {name for name, _, _ in guide_blocks()}
    assert {"getting-started.md", "pmap.md", "channels.md", "ssh.md", "custom-managers.md",
            "failures.md", "from-multiprocessing-pool.md", "scikit-learn.md",
            "from-process-pool-executor.md"} <= names


@pytest.mark.parametrize("name,i,code", guide_blocks(), ids=lambda v: str(v)[:24])
def test_guide_code_compiles(name, i, code):
    ast.parse(code, filename=f"{name} block {i}")


RUNNABLE = "# runs with: "  # then "pydist -p 2" (2 local workers) or "python"
NEEDS = "# needs: "  # then the optional extras a block needs (keys of EXTRAS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "name,i,code", [b for b in guide_blocks() if b[2].startswith(RUNNABLE)],
    ids=lambda v: str(v)[:24])
def test_guide_code_runs(name, i, code, tmp_path):
    """Blocks that start with RUNNABLE run as written: "# runs with: pydist -p 2" on 2 local
    workers, "# runs with: python" as a plain script. A second line "# needs: joblib" (or
    sklearn, ...) names an optional extra: without it the block skips (fails under
    PYDIST_REQUIRE_EXTRAS=1)."""
    for line in code.splitlines()[1:]:
        if not line.startswith(NEEDS):
            break
        for extra in line[len(NEEDS):].replace(",", " ").split():
            assert extra in EXTRAS, f"{name} block {i}: unknown extra {extra!r}"
            require_extra(EXTRAS[extra])
    script = tmp_path / f"{name[:-3]}_{i}.py"
    script.write_text(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]))
    how = code.splitlines()[0][len(RUNNABLE):].strip()
    assert how in ("pydist -p 2", "python"), f"{name} block {i}: unknown runner {how!r}"
    argv = ["-m", "pydist", "-p", "2"] if how.startswith("pydist") else []
    out = subprocess.run([sys.executable, *argv, str(script)],
                         capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, f"{name} block {i}:\n{out.stdout}{out.stderr}"


def test_each_guide_has_a_runnable_block():
    runnable = {name for name, _, code in guide_blocks() if code.startswith(RUNNABLE)}
    assert runnable >= {"getting-started.md", "pmap.md", "channels.md", "custom-managers.md",
                        "failures.md", "scikit-learn.md", "from-process-pool-executor.md"}


# ---------------------------------------------------------------- types
@pytest.mark.timeout(300)
def test_type_check_of_package_examples_and_typing_checks():
    require("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "src/pydist", "examples", "tests/typing"],
        capture_output=True, text=True, cwd=ROOT, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr


def test_typing_checks_state_the_types_users_see():
    with open(os.path.join(ROOT, "tests", "typing", "check_api_types.py")) as f:
        text = f.read()
    for claim in ("assert_type(remotecall_fetch(", "Future[int]", "assert_type(fetch("):
        assert claim in text


def test_package_is_typed():
    assert os.path.exists(os.path.join(ROOT, "src", "pydist", "py.typed"))
    assert os.path.exists(os.path.join(ROOT, "LICENSE"))
