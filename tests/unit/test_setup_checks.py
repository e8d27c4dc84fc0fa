"""A setup is checked once (design.md §1, model_setup.py): `ModelSetup.problems` holds every check, `validate`
raises the first, and a recipe's `model:` section reports the same problems under its own key."""

from __future__ import annotations

import pytest

from ullme_cli.errors import UllmeError
from ullme_cli.model_setup import MIN_MAX_LENGTH, ModelSetup
from ullme_cli.recipes import ModelSection

BAD = [
    {"pooling": "max"},
    {"attention": "sideways"},
    {"padding_side": "up"},
    {"max_length": MIN_MAX_LENGTH - 1},
    {"max_length": 0},
    {"instruction_template": "no slot"},
    {"passage_template": "no slot"},
]


@pytest.mark.parametrize("values", BAD, ids=lambda v: next(iter(v.items())).__repr__())
def test_a_recipe_and_a_setup_refuse_the_same_values(values):
    key = next(iter(values))
    assert [k for k, _ in ModelSetup(**values).problems()] == [key]
    assert [k for k, _ in ModelSection(**values).problems()] == [key], "the recipe checks what the setup checks, no more, no less"
    with pytest.raises(UllmeError, match=key.split("_")[0]):
        ModelSetup(**values).validate()


def test_the_smallest_max_length_is_one_number():
    """A setup and a recipe once disagreed (2 and 8): the recipe's model: is a setup, so one bound holds both."""
    assert not list(ModelSetup(max_length=MIN_MAX_LENGTH).problems())
    assert not list(ModelSection(max_length=MIN_MAX_LENGTH).problems())


def test_only_training_adds_the_weights_dtype():
    assert [k for k, _ in ModelSection(dtype="float16").problems()] == ["dtype"]


def test_none_is_a_value_only_of_a_field_typed_to_hold_it():
    """options.outside_choices: `str | None` fields take None (search's aggregate None returns chunks, index's metric
    None is the vectors' own); a `str` field such as a setup's pooling refuses it, as any other value outside."""
    from ullme_cli.retrieval_options import IndexOptions, SearchOptions

    assert SearchOptions(aggregate=None).validate() and IndexOptions(metric=None).validate()
    with pytest.raises(UllmeError, match="unknown pooling 'None'"):
        ModelSetup(pooling=None).validate()
    with pytest.raises(UllmeError, match="unknown --metric 'cosine'"):
        IndexOptions(metric="cosine").validate()
