"""Problems from records in memory: ``problems_from_records`` on a ``datasets.Dataset`` and on dict lists
in every schema ``load_problems`` reads (what a TRL user passes as ``train_dataset``)."""

from __future__ import annotations

import pytest

from bcr.data.problems import DataError, Problem, problems_from_records

DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of "
                    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_REMINDER = '\n\nRemember to put your answer on its own line after "Answer:".'
DAPO_ROWS = [  # DAPO-Math-17k's (verl's) schema, as tests/data/test_problems_dapo.py reads it from files
    {"data_source": "math_dapo",
     "prompt": [{"role": "user", "content": DAPO_INSTRUCTION + "Find the sum of all $x$ with $x^2 = 49$." + DAPO_REMINDER}],
     "ability": "MATH", "reward_model": {"ground_truth": "0", "style": "rule-lean"},
     "extra_info": {"index": "9a9b6eb4"}},
    {"data_source": "math_dapo",
     "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many primes are below $20$?"}],
     "ability": "MATH", "reward_model": {"ground_truth": "8", "style": "rule"}, "extra_info": {"index": "7"}},
]


def check_dapo(problems):
    assert [(p.id, p.problem, p.answer) for p in problems] == [
        ("9a9b6eb4", "Find the sum of all $x$ with $x^2 = 49$.", "0"),  # DAPO's answer-format wrapper removed
        ("7", "How many primes are below $20$?", "8")]
    assert problems[0].meta["data_source"] == "math_dapo" and problems[0].meta["ability"] == "MATH"

SCHEMAS = {
    "shared": ({"id": "a1", "problem": "What is 2 + 3?", "answer": "5", "level": 1},
               ("a1", "What is 2 + 3?", "5")),
    "gsm8k": ({"question": "Tom has 1,000 + 600 apples.", "answer": "1000 + 600 = <<1000+600=1600>>1600\n#### 1,600"},
              ("records-0", "Tom has 1,000 + 600 apples.", "1600")),
    "math": ({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "unique_id": "m/7"},
             ("m/7", "Half of one?", "\\frac{1}{2}")),
    "olympiadbench": ({"question": "Roots?", "final_answer": ["1", "2"]}, ("records-0", "Roots?", "1, 2")),
    "trl_prompt": ({"prompt": "What is 7 * 6?", "answer": 42}, ("records-0", "What is 7 * 6?", "42")),
    "trl_conversational": ({"prompt": [{"role": "system", "content": "Think."}, {"role": "user", "content": "9 - 4?"}],
                            "answer": "5"}, ("records-0", "9 - 4?", "5")),
}


@pytest.mark.parametrize("schema", sorted(SCHEMAS))
def test_each_schema_from_a_dict_list(schema):
    record, expected = SCHEMAS[schema]
    (p,) = problems_from_records([record])
    assert (p.id, p.problem, p.answer) == expected


def test_extras_go_to_meta_and_gsm8k_rationale_is_kept():
    shared, gsm8k = problems_from_records([SCHEMAS["shared"][0], SCHEMAS["gsm8k"][0]])
    assert shared.meta == {"level": 1}
    assert gsm8k.meta == {"solution": "1000 + 600 = 1600"} and gsm8k.id == "records-1"


def test_dapo_message_records():
    check_dapo(problems_from_records(DAPO_ROWS))


def test_a_datasets_dataset_in_each_schema():
    datasets = pytest.importorskip("datasets")
    records = [SCHEMAS["shared"][0], {"problem": "What is 1 + 1?", "answer": "2"}]
    ds = datasets.Dataset.from_list(records)
    assert [(p.id, p.problem, p.answer) for p in problems_from_records(ds, label="train_dataset")] == [
        ("a1", "What is 2 + 3?", "5"), ("train_dataset-1", "What is 1 + 1?", "2")]
    # DAPO's nested columns (messages, reward_model, extra_info) come back from Arrow as lists and dicts
    check_dapo(problems_from_records(datasets.Dataset.from_list(DAPO_ROWS)))
    trl = datasets.Dataset.from_dict({"prompt": ["3 + 4?", "5 + 6?"], "answer": ["7", "11"]})
    assert [(p.problem, p.answer) for p in problems_from_records(trl)] == [("3 + 4?", "7"), ("5 + 6?", "11")]


def test_a_dataset_dict_asks_for_one_split():
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list([SCHEMAS["shared"][0]]))
    with pytest.raises(DataError, match=r"train_dataset: a dataset with splits \['train'\]; pass one split, "
                                        r"e.g. dataset\['train'\]"):
        problems_from_records(dd, label="train_dataset")


def test_a_malformed_record_names_its_index_and_the_missing_field():
    records = [SCHEMAS["shared"][0], {"problem": "No answer here"}, {"answer": "3"}]
    with pytest.raises(DataError, match=r"^train_dataset record 1: missing field 'answer'.*fields present: problem"):
        problems_from_records(records, label="train_dataset")
    with pytest.raises(DataError, match=r"^records record 2: missing field 'problem' \(or 'question', or 'prompt'\)"):
        problems_from_records([records[0], records[0], records[2]])


def test_skip_invalid_skips_and_reports():
    records = [SCHEMAS["shared"][0], {"problem": "No answer here"}, {"problem": "P", "answer": "1"}]
    with pytest.warns(UserWarning, match=r"problems_from_records: skipped 1 invalid row\(s\) of 3"):
        out = problems_from_records(records, skip_invalid=True)
    assert [p.problem for p in out] == ["What is 2 + 3?", "P"]
    assert (out.report.rows_read, out.report.loaded, out.report.skipped) == (3, 2, 1)
    assert out.report.errors[0].startswith("records record 1: missing field 'answer'")


def test_problems_pass_through_and_mix_with_records():
    p = Problem(id="x", problem="Q", answer="1")
    out = problems_from_records([p, {"problem": "R", "answer": "2"}], limit=2)
    assert out[0] is p and (out[1].id, out[1].answer) == ("records-1", "2")
    assert len(problems_from_records([p, p, p], limit=1)) == 1


@pytest.mark.parametrize("bad,message", [
    (["What is 2 + 2?"], r"records record 0: a string, which has no reference answer"),
    ([("2 + 2", "4")], r"records record 0: a tuple; expected a dict record or a Problem"),
    ("gsm8k", r"got str 'gsm8k', not records; to read a file, benchmark or Hub dataset pass load_problems"),
    ({"problem": "2 + 2", "answer": "4"}, r"got one dict \(keys \['problem', 'answer'\]\), not a list of records"),
    (42, r"expected a datasets.Dataset or a list of records, got int"),
])
def test_what_is_not_records_is_named(bad, message):
    with pytest.raises(DataError, match=message):
        problems_from_records(bad)


def test_a_pandas_dataframe_is_read_by_rows():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"question": ["A?", "B?"], "answer": ["x #### 3", None]})
    with pytest.raises(DataError, match=r"^records record 1: missing field 'answer'"):
        problems_from_records(df)
    (p,) = problems_from_records(df.iloc[:1])
    assert (p.problem, p.answer) == ("A?", "3")
