"""tasks.evaluate.lm_eval_suite: a local lm-eval task YAML (local data, offline) run on the tiny Llama, plain and
4-bit + LoRA adapter, written as tasks.evaluate.predict's files so the paired statistics read it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_ops.tasks import metrics as M
from qlora_ops.tasks.evaluate.predict import per_row
from qlora_ops.tasks.evaluate.lm_eval_suite import SuiteError, evaluate_suite, load_task, run_suite
from qlora_ops.tasks.core.util import read_jsonl
from tests.conftest import tiny_params

pytestmark = pytest.mark.slow

DOCS = [{"id": "q-json", "question": "Which module parses JSON?", "answer": "json", "choices": ["json", "os", "re"], "label": 0},
        {"id": "q-re", "question": "Which module matches patterns?", "answer": "re", "choices": ["json", "os", "re"], "label": 2},
        {"id": "q-os", "question": "Which module lists directories?", "answer": "os", "choices": ["json", "os", "re"], "label": 1},
        {"id": "q-math", "question": "Which module has sqrt?", "answer": "math", "choices": ["math", "os", "re"], "label": 0}]
COMMON = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/qa.jsonl\ntest_split: test\n" \
         "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("suite")
    (d / "data").mkdir()
    (d / "data" / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "gen.yaml").write_text("task: tiny_gen\n" + COMMON + "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
                                "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 6, do_sample: false}\n"
                                "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    (d / "mc.yaml").write_text("task: tiny_mc\n" + COMMON + "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                               "doc_to_target: label\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return d


def test_task_yaml_paths_are_local_and_refused_clearly(suite_dir, tmp_path):
    cfg = load_task(suite_dir / "gen.yaml")
    assert cfg["dataset_kwargs"]["data_files"] == {"test": str(suite_dir / "data" / "qa.jsonl")}  # from the YAML's folder
    (tmp_path / "missing.yaml").write_text((suite_dir / "gen.yaml").read_text())
    with pytest.raises(SuiteError, match="data file data/qa.jsonl not found"):
        load_task(tmp_path / "missing.yaml")
    (tmp_path / "rolling.yaml").write_text("task: r\noutput_type: loglikelihood_rolling\n")
    with pytest.raises(SuiteError, match="no answer text"):
        load_task(tmp_path / "rolling.yaml")


def test_generate_suite_on_the_plain_model(suite_dir, tiny_model_dir, tmp_path):
    p = tiny_params(tiny_model_dir)
    m = evaluate_suite(p, "base", tiny_model_dir, suite_dir / "gen.yaml", tmp_path / "gen", metrics=["chrf"])
    rows = read_jsonl(tmp_path / "gen" / "predictions.jsonl")
    assert m == json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert m["n"] == 4 and m["metric"] == "chrf" and {"chrf", "exact_match", "lm_eval.exact_match"} <= set(m["metrics"])
    assert [r["id"] for r in rows] == [d["id"] for d in DOCS] and [r["reference"] for r in rows] == [d["answer"] for d in DOCS]
    assert m["lm_eval"]["chat_template"] and m["lm_eval"]["task"] == "tiny_gen"
    assert per_row(tmp_path / "gen")["scores"]["chrf"] == [r["scores"]["chrf"] for r in rows]


def test_multiple_choice_suite_on_4bit_model_with_adapter(suite_dir, tiny_model_dir, tmp_path):
    """What lm-eval runs on is our own QLoRA model object: 4-bit NF4 base (bitsandbytes on CPU) + LoRA."""
    from peft import LoraConfig, get_peft_model

    from qlora_ops.tasks.model.modeling import load_model

    p = tiny_params(tiny_model_dir)
    model, tok = load_model(tiny_model_dir, p, True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    m = run_suite(model, tok, suite_dir / "mc.yaml", tmp_path / "mc", name="qlora", batch_size=4)
    rows = read_jsonl(tmp_path / "mc" / "predictions.jsonl")
    assert m["n"] == 4 and [r["reference"] for r in rows] == [d["choices"][d["label"]] for d in DOCS]
    for r in rows:  # the choice ranked first vs the gold choice: our exact match IS the harness's acc, row by row
        assert r["prediction"] in DOCS[[d["id"] for d in DOCS].index(r["id"])]["choices"]
        assert r["scores"]["exact_match"] == r["scores"]["lm_eval.acc"] and r["correct"] == (r["scores"]["lm_eval.acc"] == 1)
    assert m["metrics"]["exact_match"] == pytest.approx(m["lm_eval"]["results"]["acc,none"])


def test_one_filter_per_suite_every_reference_kept_and_a_harness_metric_as_the_suite_metric(suite_dir, tiny_model_dir,
                                                                                             tmp_path):
    """A task with two filters logged one sample per filter and document: 4 documents gave 8 rows with repeated
    ids. Only the first of several targets was kept."""
    (suite_dir / "data" / "alias.jsonl").write_text("".join(
        json.dumps({**d, "aliases": [d["answer"], d["answer"].upper(), f"the {d['answer']} module"]}) + "\n" for d in DOCS))
    (suite_dir / "two.yaml").write_text(
        "task: tiny_two\n" + COMMON.replace("data/qa.jsonl", "data/alias.jsonl") + "output_type: generate_until\n"
        "doc_to_target: \"{{aliases}}\"\n"
        "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 6, do_sample: false}\n"
        "filter_list:\n  - {name: strict, filter: [{function: take_first}]}\n"
        "  - {name: first-word, filter: [{function: regex, regex_pattern: \"(\\\\w+)\"}, {function: take_first}]}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    p = tiny_params(tiny_model_dir)
    for filt in (None, "first-word"):
        out = tmp_path / str(filt)
        m = evaluate_suite(p, "base", tiny_model_dir, suite_dir / "two.yaml", out,
                           metrics=["lm_eval.exact_match", "chrf"], filter_name=filt)
        rows = read_jsonl(out / "predictions.jsonl")
        assert m["n"] == 4 and [r["id"] for r in rows] == [d["id"] for d in DOCS]  # one row per document
        assert m["lm_eval"]["filter"] == (filt or "strict") and m["metric"] == "lm_eval.exact_match"
        assert [r["references"] for r in rows] == [[d["answer"], d["answer"].upper(), f"the {d['answer']} module"]
                                                   for d in DOCS]
        assert [r["scores"]["chrf"] for r in rows] == M.score("chrf", [r["prediction"] for r in rows],
                                                              [r["references"] for r in rows])  # best of the three
        assert all(r["scores"]["lm_eval.exact_match"] in (0.0, 1.0) for r in rows)
    with pytest.raises(SuiteError, match="not one of the task's filters"):
        evaluate_suite(p, "base", tiny_model_dir, suite_dir / "two.yaml", tmp_path / "x", filter_name="flexible")
