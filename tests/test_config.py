import pytest

from invdiff.config import hyperparameters, parse_overrides


def sample_example(problem, prior, *, steps: int = 100, lr: float = 0.5, flag: bool = False, name: str = "a",
                   generator=None, callback=None):
    return None


def test_signature_is_the_schema():
    assert hyperparameters(sample_example) == {"steps": 100, "lr": 0.5, "flag": False, "name": "a"}


def test_overrides_are_typed_by_their_defaults():
    parsed = parse_overrides(sample_example, ["steps=20", "lr=1e-2", "flag=true", "name=b"])
    assert parsed == {"steps": 20, "lr": 0.01, "flag": True, "name": "b"}
    assert isinstance(parsed["steps"], int)


@pytest.mark.parametrize("item,message", [("steps=abc", "expected int"), ("nope=1", "no hyperparameter 'nope'"),
                                          ("steps", "NAME=VALUE"), ("flag=maybe", "true/false")])
def test_bad_overrides_name_the_problem(item, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides(sample_example, [item], "example")
