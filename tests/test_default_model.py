"""The real default model (embedded all-MiniLM-L6-v2) on the default task: methods learn, adapters reload in peft."""

from __future__ import annotations

import pytest
import torch

from fedlora import RunConfig, run

REAL_BOUND = 0.6  # global (or personalised) accuracy after 3 rounds; chance is 1/8


@pytest.mark.slow
# The real model with FedIT (about a minute; it also checks the peft reload). Every method learns on the tiny test
# models in tests/test_engine.py; fedex_lora, flexlora and fedsa_lora ran here too (all above 0.6) until CI time got
# tight. The real SmolLM2 runs in tests/test_causal_lm.py.
@pytest.mark.parametrize("method", ["fedit"])
def test_real_default_model_learns(method: str, tmp_path) -> None:
    cfg = RunConfig(
        method=method,
        clients=4,
        rounds=3,
        max_examples_per_label=60,
        local_epochs=2,
        global_test_fraction=0.2,
        progress=False,
        out_dir=str(tmp_path),
        run_name=method,
        threads=1,
    )
    result = run(cfg)
    key = "personal_accuracy" if method == "fedsa_lora" else "global_accuracy"
    accs = [h[key] for h in result.history]
    assert accs[-1] > REAL_BOUND, accs
    if method == "fedit":
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        from fedlora.api import build, resolve_config
        from fedlora.models import default_model_dir

        setup = build(resolve_config(result.config))
        from fedlora.adapters.peft_io import AdapterSlots

        AdapterSlots(setup.model).load(result.global_adapter)
        setup.model.eval()
        batch = setup.task.collate(setup.engine.global_test, list(range(8)), setup.pad_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        base = AutoModelForSequenceClassification.from_pretrained(default_model_dir(), num_labels=8)
        reloaded = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**inputs).logits, setup.model(**inputs).logits, rtol=1e-5, atol=1e-5)
