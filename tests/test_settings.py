"""The settings table: signature defaults, tuned values with their provenance, one override syntax typed by the
annotation. Every entry point reads :func:`invdiff.settings.effective`, so these are the rules they all follow."""
import pytest

from invdiff import settings
from invdiff.errors import InputError


def sample_example(problem, prior, *, steps: int = 100, lr: float = 0.5, flag: bool = False, name: str = "a",
                   mixed: bool | float = True, maybe: float | None = None, generator=None, callback=None):
    return None


def test_signature_is_the_schema():
    assert settings.hyperparameters(sample_example) == {"steps": 100, "lr": 0.5, "flag": False, "name": "a",
                                                        "mixed": True, "maybe": None}


@pytest.mark.parametrize("name, text, value", [
    ("steps", "20", 20), ("lr", "1e-2", 0.01), ("flag", "true", True), ("flag", "0", False), ("name", "b", "b"),
    ("mixed", "false", False), ("mixed", "100", 100.0), ("mixed", "1", 1.0), ("maybe", "none", None),
    ("maybe", "0.5", 0.5)])
def test_values_are_typed_by_the_annotation(name, text, value):
    converted = settings.convert(sample_example, name, text)
    assert converted == value and type(converted) is type(value)


@pytest.mark.parametrize("name, text", [("steps", "abc"), ("flag", "maybe"), ("mixed", "lots"), ("lr", "none")])
def test_untypable_values_are_input_errors(name, text):
    with pytest.raises(InputError, match=f"hyperparameter {name}"):
        settings.convert(sample_example, name, text)


def test_one_override_syntax():
    assert settings.parse_set(["reddiff:lam=50", "dps:zeta=0.3", "reddiff:lr=0.1"]) == {
        "reddiff": {"lam": 50.0, "lr": 0.1}, "dps": {"zeta": 0.3}}
    # the case the old parser refused: the default is a bool, the annotation says bool | float
    assert settings.parse_set(["smc:stable_likelihood=100"]) == {"smc": {"stable_likelihood": 100.0}}
    assert settings.parse_set(["steps=50"], solver="reddiff") == {"reddiff": {"steps": 50}}
    with pytest.raises(InputError, match="SOLVER:NAME=VALUE"):
        settings.parse_set(["lam=50"])
    with pytest.raises(InputError, match="uses solver 'reddiff'"):
        settings.parse_set(["dps:zeta=1"], solver="reddiff")
    with pytest.raises(InputError, match="no hyperparameter 'zeta'"):
        settings.parse_set(["reddiff:zeta=1"])
    with pytest.raises(InputError, match="unknown solver 'fancy'"):
        settings.parse_set(["fancy:zeta=1"])


def test_effective_is_signature_then_table_then_steps_then_overrides():
    signature = settings.hyperparameters("reddiff")
    ct = settings.effective("reddiff", "ct")
    assert ct == {**signature, **settings.tuned("ct", "reddiff")} and ct["init"] == "fbp"
    assert settings.effective("reddiff", None) == signature
    chosen = settings.effective("reddiff", "ct", {"lam": 3.0}, steps=7)
    assert chosen["lam"] == 3.0 and chosen["steps"] == 7 and chosen["init"] == "fbp"
    assert "steps" not in settings.effective("tv", "ct", steps=7)          # only solvers that take steps
    with pytest.raises(InputError, match="task family"):
        settings.effective("reddiff", "ultrasound")


def test_every_tuned_value_names_a_real_hyperparameter_and_its_source():
    from invdiff.registry import list_solvers
    for family, solvers in settings.TUNED.items():
        for solver, values in solvers.items():
            assert solver in list_solvers(), (family, solver)
            schema = settings.hyperparameters(solver)
            for name, entry in values.items():
                assert name in schema, (family, solver, name)
                assert entry.value != schema[name], f"{family}/{solver}/{name} repeats the signature default"
                assert len(entry.source) > 10
