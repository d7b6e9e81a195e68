"""The public API is exactly ``crdtmerge.__all__``, sorted, and every name exists."""

import crdtmerge


def test_all_is_sorted_and_complete():
    assert list(crdtmerge.__all__) == sorted(crdtmerge.__all__)
    for name in crdtmerge.__all__:
        assert hasattr(crdtmerge, name), name
    public = {n for n in dir(crdtmerge) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(crdtmerge, n)).__name__ == "module"}
    assert public - modules - set(crdtmerge.__all__) == set()


def test_library_never_imports_the_service():
    import subprocess
    import sys

    code = (
        "import sys, crdtmerge, crdtmerge.cli, crdtmerge.strategies;"
        "bad = [m for m in sys.modules if m == 'node' or m.startswith(('node.', 'fastapi', 'uvicorn', 'sqlite3'))];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
