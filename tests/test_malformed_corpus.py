"""The malformed-input corpus (tests/malformed/make_corpus.py): exit 2 or the stated exception, one line naming the
file, the key, what was expected and what was found, and the case's folder left exactly as it was.

Header cases are the documented exception: a bad ISMRMRD header falls back to the k-space grid, so they must exit 0
and say so in one WARNING line. A case marked with ``bug`` is a known bug in a file the corpus does not own: it runs
as a strict xfail, so fixing the bug turns it into a failure that asks for the mark to go.
"""
import hashlib
import logging
from pathlib import Path

import pytest

from invdiff.cli import main
from malformed.make_corpus import BUILDERS, build

MINIMUM_CASES = 25


def _tree(folder: Path) -> dict:
    """Every file (sha256) and folder (None) under ``folder``: the corpus's 'nothing left, nothing changed'."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def _params():
    params = []
    for name, (layer, builder) in BUILDERS.items():
        params.append(pytest.param(name, id=f"{layer}-{name}"))
    return params


def test_the_corpus_is_large_enough_and_spans_every_layer():
    layers = {layer for layer, _ in BUILDERS.values()}
    assert {"h5", "cli", "checkpoint", "batch", "operator", "header"} <= layers
    assert sum(1 for layer, _ in BUILDERS.values() if layer != "header") >= MINIMUM_CASES


@pytest.mark.parametrize("name", _params())
def test_malformed_input(name, tmp_path, capsys, caplog, request):
    caplog.set_level(logging.WARNING)
    case = build(name, tmp_path / "case")
    if case.skip:
        pytest.skip(case.skip)
    if case.bug:
        request.applymarker(pytest.mark.xfail(reason=case.bug, strict=True))
    capsys.readouterr()
    caplog.clear()
    before = _tree(tmp_path)
    if case.argv is not None:
        status = main(case.argv)
        err = capsys.readouterr().err.strip()
        if case.status == 0:
            assert status == 0, err
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            matching = [w for w in warnings if all(f in w for f in case.fragments)]
            assert matching, f"no WARNING with {case.fragments}: {warnings}"
            assert all("\n" not in w for w in matching)
            return
        assert status == 2, err
        assert err.startswith("invdiff: error:") and "\n" not in err, err
        message = err
    else:
        with pytest.raises(case.raises) as info:
            case.call()
        message = str(info.value)
        assert "\n" not in message, message
    missing = [f for f in case.fragments if f not in message]
    assert not missing, f"{missing} not in: {message}"
    assert _tree(tmp_path) == before, "the failed run left or changed files"
    if case.after is not None:
        complaint = case.after()
        assert complaint is None, complaint
