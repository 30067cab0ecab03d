"""Fast checks of the serving side: the loader stands alone, and the report's and card's serving section
(evaluated metric, served metric and agreement when checked, GGUF agreement when exported, the digests)."""
from __future__ import annotations

import subprocess
import sys

from qlora_ops.tasks.report.card import with_serving
from qlora_ops.tasks.report.frames import serving_rows
from qlora_ops.tasks.report.html import serving_html
from tests.conftest import ROOT

FACTS = {"version": 3, "weights_digest": "ab" * 32, "metric": "exact_match", "evaluated": 0.6075, "tags": {},
         "parity": {"url": "http://127.0.0.1:5001", "passed": False, "metric": "exact_match", "served_metric": 0.5,
                    "share": 0.25, "ci_low": 0.1, "ci_high": 0.45, "n": 16, "endpoint": {"weights_digest": "cd" * 32}},
         "gguf": {"files": [{"kind": "f16", "file": "model-f16.gguf", "sha256": "ef" * 32},
                            {"kind": "adapter", "file": "adapter-f32.gguf", "sha256": "01" * 32}],
                  "parity": {"f16": {"metric": "exact_match", "gguf_metric": 0.59, "agreement": 0.97, "ci_low": 0.93,
                                     "ci_high": 0.99, "n": 107}}}}


def test_serving_rows_name_every_number_and_digest():
    rows = serving_rows(FACTS)
    assert [r["what"] for r in rows] == ["registered (evaluated)", "served at http://127.0.0.1:5001 (FAIL)",
                                         "GGUF model-f16.gguf", "GGUF adapter-f32.gguf"]
    assert rows[0]["metric"] == "exact_match 0.6075" and rows[0]["digest"] == "weights_digest " + "ab" * 8
    assert rows[1]["metric"] == "exact_match 0.5000" and rows[1]["agreement"] == "0.7500 [0.5500, 0.9000] on 16 rows"
    assert rows[1]["digest"] == "endpoint " + "cd" * 8
    assert rows[2]["agreement"] == "0.9700 [0.9300, 0.9900] on 107 rows" and rows[2]["digest"] == "sha256 " + "ef" * 8
    assert rows[3]["agreement"] == "" and rows[3]["digest"] == "sha256 " + "01" * 8


def test_card_and_html_carry_the_section_and_say_when_unchecked():
    card = with_serving("# m v3\n\nbody\n", FACTS)
    assert "## Serving and GGUF" in card and "0.7500 [0.5500, 0.9000]" in card and card.startswith("# m v3")
    unchecked = {**FACTS, "parity": None, "gguf": None}
    html = "".join(serving_html(unchecked))
    assert "serving-table" in html and "not checked on a live endpoint yet" in html
    assert with_serving("card\n", None) == "card\n" and serving_html(None) == []
    # nothing checked or exported yet: the card is the registration-time description, unchanged
    assert with_serving("card\n", unchecked) == "card\n"


def test_a_long_card_keeps_the_serving_section_within_mlflows_limit():
    from qlora_ops.tasks.report.card import CARD_LIMIT

    card = with_serving("# m v3\n" + "x" * (CARD_LIMIT + 100), FACTS)
    assert len(card) <= CARD_LIMIT and card.rstrip().endswith("|") and "## Serving and GGUF" in card


def test_the_loader_module_stands_alone():
    """What `mlflow models serve` imports to load a model: qlora_ops.tasks.registry.loader and what it needs
    (model.prompting, core.util, the packages holding them), nothing from flows/ or the training core, and no
    torch before a model is loaded."""
    code = ("import sys, qlora_ops.tasks.registry.loader; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('qlora_ops', 'tasks', 'flows', 'torch', 'transformers', 'prefect')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PATH": ""}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(["qlora_ops", "qlora_ops.tasks", "qlora_ops.tasks.core", "qlora_ops.tasks.core.util",
                                      "qlora_ops.tasks.model", "qlora_ops.tasks.model.prompting", "qlora_ops.tasks.registry",
                                      "qlora_ops.tasks.registry.loader"])


def test_a_scoring_server_gets_no_credential(monkeypatch):
    """Security issue item 3: the scoring server serves a checked local copy and needs no login; an exploited
    model server must not find the MLflow, Prefect, S3 or webhook secrets in its environment."""
    from qlora_ops.tasks.registry.loader import DIGEST_ENV, DTYPE_ENV
    from qlora_ops.tasks.serving.server import server_env

    planted = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "pw1", "MLFLOW_TRACKING_TOKEN": "t1",
               "MLFLOW_TRACKING_URI": "http://u:pw2@mlflow:5000", "PREFECT_API_AUTH_STRING": "u:pw3",
               "PREFECT_API_KEY": "k1", "AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s1",
               "QLORA_OPS_WEBHOOK_SECRET": "whs", "HF_TOKEN": "hf1", "MINIO_ROOT_PASSWORD": "m1"}
    for k, v in planted.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    env = server_env("d" * 64, "bfloat16")
    assert not set(planted) & set(env), sorted(set(planted) & set(env))
    assert not [v for v in env.values() if v in planted.values()]
    assert env[DIGEST_ENV] == "d" * 64 and env[DTYPE_ENV] == "bfloat16" and env["TOKENIZERS_PARALLELISM"] == "false"
