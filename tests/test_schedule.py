import pytest

from fasterdiff.schedule import KeySteps, paper_key_steps, parse_step_list, resolve


def test_paper_schedules_match_the_paper_exactly():
    assert paper_key_steps(50) == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert paper_key_steps(20) == (0, 1, 2, 3, 5, 10, 15)


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (0,)),
        (2, (0, 1)),
        (10, (0, 1, 2, 3, 5)),
        (25, (0, 1, 2, 3, 5, 10, 15)),
        (100, (0, 1, 2, 3, 5, 10, 15, 25, 35, 45, 55, 65, 75)),
    ],
)
def test_paper_rule_for_other_step_counts(n, expected):
    assert paper_key_steps(n) == expected


@pytest.mark.parametrize("n", range(1, 101))
def test_paper_rule_invariants(n):
    steps = paper_key_steps(n)
    assert steps[0] == 0
    assert list(steps) == sorted(set(steps))
    assert all(s <= 0.75 * n for s in steps[1:])


def test_uniform_custom_off():
    assert resolve(5, 12).steps == (0, 5, 10)
    assert resolve([0, 4, 7], 10).steps == (0, 4, 7)
    assert resolve("off", 4).steps == (0, 1, 2, 3)


def test_groups_cover_every_step_once():
    plan = KeySteps(num_steps=12, steps=(0, 5, 10))
    assert [list(g) for g in plan.groups] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fast", "unknown schedule"),
        (1, "interval"),
        (0, "interval"),
        (True, "expected"),
        ([], "at least step 0"),
        ([1, 2], "start with step 0"),
        ([0, 3, 2], "strictly increasing"),
        ([0, 2, 2], "strictly increasing"),
        ([0, -1], "outside"),
        ([0, 10], r"outside 0..9: the run makes 10 UNet evaluations \(num_inference_steps; PNDM one more\)"),
        ([0, 1.5], "ints"),
        (2.5, "expected"),
    ],
)
def test_bad_key_steps_raise_value_error_naming_the_argument(spec, match):
    with pytest.raises(ValueError, match=match) as err:
        resolve(spec, 10)
    assert "key_steps" in str(err.value)


@pytest.mark.parametrize("text", ["", "0,,3", "a", "0, x", "-1", "1.5", " , "])
def test_parse_step_list_rejects_malformed(text):
    with pytest.raises(ValueError, match="custom_key_steps"):
        parse_step_list(text)


def test_parse_step_list():
    assert parse_step_list(" 0, 1,5 ") == [0, 1, 5]
