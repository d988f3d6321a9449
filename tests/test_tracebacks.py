"""Remote tracebacks of code sent by value show its real file, line number and source line.

cloudpickle 3.1.3 names every code object it pickles "<dynamic-code>", and no cloudpickle
ships source lines, so without `serialization._reduce_code` a lambda, a closure or a
`__main__` function failing on a worker shows no file name (3.1.3) or no source line where the
file is not on the worker (every version). Each test reads the traceback text a caller sees.
"""

from __future__ import annotations

import linecache
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

import pydist
from pydist import serialization

THIS = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(THIS))


def line_of(marker: str, path: str = THIS) -> tuple[int, str]:
    """(line number, stripped text) of the one line of `path` carrying the comment `# marker`."""
    with open(path) as f:
        found = [(n, line.strip()) for n, line in enumerate(f, 1) if f"# {marker}" in line]
    assert len(found) == 1, found
    return found[0]


def remote_error_text(f, *args, pid: int) -> str:
    with pytest.raises(pydist.RemoteException) as info:
        pydist.remotecall_fetch(f, pid, *args)
    assert info.value.pid == pid
    return str(info.value)


def assert_frame(text: str, filename: str, line: tuple[int, str], function: str) -> None:
    """`text` has the frame `File "filename", line N, in function` followed by the source."""
    n, source = line
    frame = f'File "{filename}", line {n}, in {function}\n'
    assert frame in text, text
    after = text.split(frame, 1)[1].splitlines()[0]
    assert after.strip() == source, text
    assert "<dynamic-code>" not in text


def test_by_value_code_keeps_its_file_name_when_pickled():
    def outer(x):
        return (lambda y: y / x)(1)

    for f in (outer, lambda: 0):
        body, buffers, context = serialization.dumps(f, oob=False)
        g = serialization.loads(body)
        assert g is not f
        assert g.__code__.co_filename == THIS
        assert g.__code__.co_firstlineno == f.__code__.co_firstlineno
        nested = [c for c in g.__code__.co_consts if hasattr(c, "co_filename")]
        assert all(c.co_filename == THIS for c in nested)


def test_remote_lambda_error_shows_file_line_and_source(two_workers):
    w = two_workers[0]
    fails = lambda x: x / 0  # noqa: E731 - tb-lambda
    text = remote_error_text(fails, 7, pid=w)
    assert text.startswith(f"On worker {w}:\n") and "ZeroDivisionError" in text
    assert_frame(text, THIS, line_of("noqa: E731 - tb-lambda"), "<lambda>")


def make_nested(divisor):
    def outer(x):
        def inner(y):
            return y / divisor["by"]  # tb-inner
        return inner(x) + 1  # tb-outer
    return outer


@pytest.mark.parametrize("divisor", [0, {"by": 0}], ids=["cached-bytes", "whole-message"])
def test_remote_nested_closure_error_shows_every_frame(two_workers, divisor):
    """A closure of immutable values goes through the cached by-value bytes; one holding a
    dict sends the whole call through cloudpickle: both keep the frames' files and lines."""
    w = two_workers[1]
    if divisor == 0:
        def outer(x):
            def inner(y):
                return y / divisor  # tb-cached-inner
            return inner(x) + 1  # tb-cached-outer
        inner_line, outer_line = line_of("tb-cached-inner"), line_of("tb-cached-outer")
    else:
        outer = make_nested(divisor)
        inner_line, outer_line = line_of("tb-inner"), line_of("tb-outer")
    text = remote_error_text(outer, 3, pid=w)
    assert_frame(text, THIS, outer_line, "outer")
    assert_frame(text, THIS, inner_line, "inner")
    assert text.index(f"line {outer_line[0]}, in outer") < text.index(
        f"line {inner_line[0]}, in inner")


@pytest.mark.parametrize("kind", ["notebook-cell", "missing-path"])
def test_source_of_code_whose_file_is_not_on_the_worker(two_workers, kind):
    """Code compiled from text the worker cannot read (a notebook cell, a file only on the
    master): its lines travel with it. Two functions of one cell, shipped in turn, both show
    their lines (the worker merges what it receives for one file name)."""
    w = two_workers[0]
    tag = uuid.uuid4().hex
    name = f"<cell-{tag}>" if kind == "notebook-cell" else f"/nonexistent-{tag}/cell.py"
    source = textwrap.dedent("""\
        import math

        def first(x):
            return math.sqrt(x)  # cell-first

        def second(x):
            y = x - 1
            return first(y) * 2  # cell-second
    """)
    # What IPython does with a cell: its text goes into linecache under the cell's name.
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    namespace = {"__name__": "__main__"}
    exec(compile(source, name, "exec"), namespace)
    lines = source.splitlines()
    at = {m: (n, lines[n - 1].strip()) for n in range(1, len(lines) + 1)
          for m in ("cell-first", "cell-second") if f"# {m}" in lines[n - 1]}

    text = remote_error_text(namespace["first"], -1.0, pid=w)
    assert "ValueError: math domain error" in text
    assert_frame(text, name, at["cell-first"], "first")
    text = remote_error_text(namespace["second"], 0.0, pid=w)
    assert_frame(text, name, at["cell-second"], "second")
    assert_frame(text, name, at["cell-first"], "first")
    # The worker loaded `first` once and keeps it; its lines come back if linecache is cleared.
    pydist.remotecall_fetch(linecache.clearcache, w)
    text = remote_error_text(namespace["first"], -2.0, pid=w)
    assert_frame(text, name, at["cell-first"], "first")


MAIN_SCRIPT = """\
import os
import sys

import pydist

def fails(x):
    return {"a": 1}[x]  # main-fails

def calls_a_lambda(x):
    g = lambda y: y.missing_attribute  # noqa: E731 - main-lambda
    return g(x)

if __name__ == "__main__":
    if "--alone" in sys.argv:
        # A script that exists on the master only: read it (as a traceback would), then
        # remove it, so that the worker cannot read it.
        import linecache
        linecache.getlines(__file__)
        os.remove(__file__)
        pydist.addprocs(1)
    w = pydist.workers()[0]
    assert w != 1
    for f, arg in ((fails, "b"), (calls_a_lambda, 5)):
        try:
            pydist.remotecall_fetch(f, w, arg)
        except pydist.RemoteException as e:
            print(e)
            print("----")
    pydist.rmprocs(pydist.workers())
"""


@pytest.mark.parametrize("how", ["pydist-cli", "script-only-on-master"])
def test_main_script_function_error_shows_file_line_and_source(tmp_path, how):
    script = str(tmp_path / "script_with_errors.py")
    with open(script, "w") as f:
        f.write(MAIN_SCRIPT)
    fails_line = line_of("main-fails", script)
    lambda_line = line_of("noqa: E731 - main-lambda", script)
    calls_line = (lambda_line[0] + 1, "return g(x)")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    if how == "pydist-cli":
        cmd = [sys.executable, "-m", "pydist", "-p", "1", script]
    else:
        cmd = [sys.executable, script, "--alone"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    if how != "pydist-cli":
        assert not os.path.exists(script)
    first, second = out.stdout.split("----\n")[:2]
    assert "KeyError: 'b'" in first
    assert_frame(first, script, fails_line, "fails")
    assert "AttributeError" in second
    assert_frame(second, script, calls_line, "calls_a_lambda")
    assert_frame(second, script, lambda_line, "<lambda>")


def test_a_failed_future_fetched_again_shows_its_frames_once(two_workers):
    """Each fetch of a failed Future raises its error with that fetch's frames on top of the
    error's own, not on top of every earlier fetch's (raising one exception object again
    keeps the frames of the raise before); the remote traceback stays as it was."""
    import traceback

    f = pydist.remotecall(int, two_workers[0], "not a number")
    seen = []
    for _ in range(3):
        try:
            f.fetch()
        except pydist.RemoteException as e:
            frames = traceback.extract_tb(e.__traceback__)
            seen.append(([fr.name for fr in frames], str(e)))
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2], seen
    assert seen[0][0].count("fetch") == 1, seen[0]
    assert "invalid literal for int()" in seen[0][1]
    for _ in range(2):
        with pytest.raises(pydist.RemoteException) as info:
            f.result()
        assert [fr.name for fr in traceback.extract_tb(info.value.__traceback__)].count("result") == 1
    assert f.exception() is info.value
