"""A run's outputs work anywhere: ``fedlora export`` (merged, and base + adapter for peft) reproduces
``load_trained``'s logits for base-changing and personal methods, label names travel, adapter configs name the
real base model, ``load_trained`` refuses what a run does not hold, and the README's snippets run as written."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

import fedlora.export as export_mod
from fedlora import load_trained, run
from fedlora.cli import main
from fedlora.export import DEFAULT_MODEL_HUB_ID, EXPORT_MARKER, ExportError, export, public_model_name
from fedlora.runs import RunDirError

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = [
    "a domesticated carnivorous mammal kept as a pet",
    "a tool with a sharp blade for cutting wood",
    "the first light of day",
    "an edible fruit with a red skin",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tiny_bert: str, tmp_path_factory) -> dict[str, Path]:
    """Short finished runs (2 rounds) on the tiny BERT, one per kind of output."""
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for method in ("fedit", "flora", "feddpa", "fedsa_lora"):
        opts = {"inference_weight": 0.7} if method == "feddpa" else {}
        cfg = tiny_config(
            tiny_bert, out, method=method, run_name=method, rounds=2, max_examples_per_label=20, local_epochs=1
        )
        made[method] = run(cfg.replace(method_options=opts) if opts else cfg).run_dir
    return made


def _logits(model: torch.nn.Module, tokenizer, texts: list[str] = TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _labels(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "data.json").read_text())["labels"]


def _readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _code_blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


# ---------------------------------------------------------------------------------------------- export routes
@pytest.mark.parametrize(("method", "adapter"), [("fedit", "adapter"), ("flora", "adapter"), ("feddpa", "client-0")])
def test_export_merged_equals_load_trained(runs: dict[str, Path], method: str, adapter: str, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    client = 0 if adapter == "client-0" else None
    ours, tokenizer = load_trained(runs[method], client=client)
    out = export(runs[method], tmp_path / "merged", client=client)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    theirs = _logits(model, AutoTokenizer.from_pretrained(out))
    torch.testing.assert_close(theirs, _logits(ours, tokenizer), rtol=ATOL, atol=ATOL)
    labels = _labels(runs[method])
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.label2id == {name: i for i, name in enumerate(labels)}
    record = json.loads((out / EXPORT_MARKER).read_text())
    assert record["merged"] is True and record["adapter"] == ("personal/client-0" if client == 0 else "adapter")
    assert not list(tmp_path.glob(".merged*"))  # no temporary directory left behind


@pytest.mark.parametrize(("method", "client"), [("flora", None), ("feddpa", 0)])
def test_export_unmerged_is_the_peft_route(runs: dict[str, Path], method: str, client: int | None, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ours, tokenizer = load_trained(runs[method], client=client)
    want = _logits(ours, tokenizer)
    out = export(runs[method], tmp_path / "peft", client=client, merged=False)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(out / "base")
    base = AutoModelForSequenceClassification.from_pretrained(out / "base")
    assert base.config.id2label[0] == _labels(runs[method])[0]
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    torch.testing.assert_close(_logits(model, AutoTokenizer.from_pretrained(out / "base")), want, rtol=ATOL, atol=ATOL)
    if method == "flora":
        # the saved adapter on the original base is NOT the trained model: the base-weight change matters
        plain_base = AutoModelForSequenceClassification.from_pretrained(
            json.loads((runs[method] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"],
            num_labels=8,
            ignore_mismatched_sizes=True,
        )
        plain = PeftModel.from_pretrained(plain_base, runs[method] / "adapter").eval()
        assert (_logits(plain, tokenizer) - want).abs().max() > 1e-3
    else:  # FedDPA's global + local adapters travel as one plain adapter of twice the rank
        assert cfg["r"] == 2 * json.loads((runs[method] / "config.json").read_text())["lora_r"]


def test_export_out_rules(runs: dict[str, Path], tmp_path, monkeypatch) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    afile = tmp_path / "afile"
    afile.write_text("x")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(export_mod, "build_base", no_loading)
    with pytest.raises(ExportError, match="is not empty and is not an earlier fedlora export"):
        export(runs["fedit"], busy)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="exists and is not a directory"):
        export(runs["fedit"], afile)
    with pytest.raises(ExportError, match="a part of its path is a file"):
        export(runs["fedit"], afile / "sub" / "out")
    with pytest.raises(ExportError, match="not empty"):
        export(runs["fedit"], runs["fedit"])  # the run directory itself
    monkeypatch.undo()

    # an empty directory, then the export itself, may be (re)written; a failed rewrite keeps the old export
    out = tmp_path / "out"
    out.mkdir()
    export(runs["fedit"], out)
    first = (out / "model.safetensors").read_bytes()
    export(runs["flora"], out)
    assert json.loads((out / EXPORT_MARKER).read_text())["method"] == "flora"

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedlora.export.shutil.copytree", broken_save)
    with pytest.raises(ExportError, match="No space left on device"):
        export(runs["fedit"], out, merged=False)
    assert json.loads((out / EXPORT_MARKER).read_text())["method"] == "flora"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "busy", "out"]  # temporary directory removed
    assert (out / "model.safetensors").read_bytes() != first


def test_cli_export(runs: dict[str, Path], tmp_path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification

    assert main(["export", str(runs["fedsa_lora"]), str(tmp_path / "c1"), "--adapter", "personal/client-1"]) == 0
    assert "personal/client-1" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c1")
    assert model.config.id2label[1] == _labels(runs["fedsa_lora"])[1]
    assert main(["export", str(runs["flora"]), str(tmp_path / "p"), "--unmerged"]) == 0
    assert (tmp_path / "p" / "base" / "config.json").is_file()
    assert (tmp_path / "p" / "adapter" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", str(runs["fedsa_lora"]), str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "fedlora: error: method 'fedsa_lora' has no global adapter" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()
    assert main(["export", str(runs["fedsa_lora"]), str(tmp_path / "c9"), "--client", "9"]) == 2
    assert "client 9 is out of range: the run has 4 clients" in capsys.readouterr().err
    assert main(["export", str(runs["fedsa_lora"]), str(tmp_path / "c2"), "--client", "2", "--unmerged"]) == 0
    assert json.loads((tmp_path / "c2" / EXPORT_MARKER).read_text())["adapter"] == "personal/client-2"


def test_conv1d_base_change_matches_the_engine(tiny_gpt2: str, tmp_path) -> None:
    """GPT-2 stores its weights (in, out): the base-weight change is transposed there, in load_trained and in the
    export, and both equal the run's own final model."""
    from transformers import AutoModelForSequenceClassification

    from fedlora.adapters.peft_io import AdapterSlots, add_to_base
    from fedlora.api import build, resolve_config

    result = run(tiny_config(tiny_gpt2, tmp_path, method="flora", rounds=2, max_examples_per_label=20, local_epochs=1))
    setup = build(resolve_config(result.config))
    add_to_base(setup.model, setup.layout, result.base_delta)
    AdapterSlots(setup.model).load(result.global_adapter)
    engine_logits = _logits(setup.model.eval(), setup.tokenizer)
    loaded, tokenizer = load_trained(result.run_dir)
    torch.testing.assert_close(_logits(loaded, tokenizer), engine_logits, rtol=ATOL, atol=ATOL)
    out = export(result.run_dir, tmp_path / "gpt2")
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(merged, tokenizer), engine_logits, rtol=ATOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------- load_trained
def test_load_trained_labels_and_choices(runs: dict[str, Path]) -> None:
    labels = _labels(runs["fedit"])
    model, tokenizer = load_trained(runs["fedit"])
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    assert model.config.label2id[labels[3]] == 3

    fedsa = runs["fedsa_lora"]
    with pytest.raises(RunDirError, match=r"'fedsa_lora' has no global adapter.*personal/client-0 … personal/client-3"):
        load_trained(fedsa)
    with pytest.raises(RunDirError, match=r"client 4 is out of range: the run has 4 clients"):
        load_trained(fedsa, client=4)
    with pytest.raises(RunDirError, match=r"client 7 is out of range"):
        load_trained(fedsa, "personal/client-7")
    with pytest.raises(RunDirError, match=r"'fedit' keeps no per-client models"):
        load_trained(runs["fedit"], client=0)
    with pytest.raises(RunDirError, match=r"adapter 'personal/c1' is not a model of this run"):
        load_trained(fedsa, "personal/c1")
    with pytest.raises(RunDirError, match="disagree"):
        load_trained(fedsa, "personal/client-1", client=2)
    a, tok = load_trained(fedsa, client=1)
    b, _ = load_trained(fedsa, "personal/client-1/")
    c, _ = load_trained(fedsa, "personal/client-2")
    torch.testing.assert_close(_logits(a, tok), _logits(b, tok), rtol=0, atol=0)
    assert (_logits(a, tok) - _logits(c, tok)).abs().max() > 1e-4  # really each client's own model


def test_load_trained_refuses_unfinished_runs(runs: dict[str, Path], tmp_path) -> None:
    killed = tmp_path / "killed"
    shutil.copytree(runs["fedit"], killed)
    (killed / "summary.json").unlink()
    shutil.rmtree(killed / "adapter")
    with pytest.raises(RunDirError, match=r"has not finished .*fedlora run --resume"):
        load_trained(killed)
    with pytest.raises(RunDirError, match=r"has not finished"):
        export(killed, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    extended = tmp_path / "extended"  # resumed with --rounds 5 and killed: the adapter is round 2's
    shutil.copytree(runs["fedit"], extended)
    cfg = json.loads((extended / "config.json").read_text())
    (extended / "config.json").write_text(json.dumps({**cfg, "rounds": 5}))
    with pytest.raises(RunDirError, match=r"extended to 5 rounds and has not finished"):
        load_trained(extended)

    partial = tmp_path / "partial"  # a personal model missing its named sub-adapter
    shutil.copytree(runs["feddpa"], partial)
    shutil.rmtree(partial / "personal" / "client-2" / "local")
    with pytest.raises(RunDirError, match=r"no finished personal/client-2/ .*local/adapter_config.json is missing"):
        load_trained(partial, client=2)
    with pytest.raises(RunDirError, match="does not exist"):
        load_trained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- saved adapters
def test_saved_adapters_name_the_base_model_and_labels(runs: dict[str, Path], tiny_bert: str) -> None:
    for method in ("fedit", "feddpa", "fedsa_lora"):
        run_dir = runs[method]
        configs = sorted(run_dir.glob("adapter/**/adapter_config.json")) + sorted(
            run_dir.glob("personal/**/adapter_config.json")
        )
        assert configs
        for path in configs:
            assert json.loads(path.read_text())["base_model_name_or_path"] == str(Path(tiny_bert).resolve())
        for labels_file in [*run_dir.glob("adapter/labels.json"), *run_dir.glob("personal/client-*/labels.json")]:
            assert json.loads(labels_file.read_text())["labels"] == _labels(run_dir)
        assert (run_dir / "personal" / "client-0" / "labels.json").is_file() or method == "fedit"
        assert not list(run_dir.glob(".*.tmp"))


def test_public_model_name(tmp_path, monkeypatch) -> None:
    assert public_model_name("default") == DEFAULT_MODEL_HUB_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_model_name("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert public_model_name("my-model") == str(tmp_path.resolve() / "my-model")
    assert public_model_name("./my-model/") == str(tmp_path.resolve() / "my-model")


# ---------------------------------------------------------------------------------------------- the README
def test_readme_snippets_run_as_written(runs: dict[str, Path], tmp_path) -> None:
    section = _readme_section("Using a trained model")
    python, export_code = _code_blocks(section, "python")
    assert 'load_trained("runs/20261122-101500-fedit")' in python
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(python.replace("runs/20261122-101500-fedit", str(runs["fedit"])), {})
    printed = ast.literal_eval(stdout.getvalue().strip())  # the printed list of label names
    assert len(printed) == 2 and set(printed) <= set(_labels(runs["fedit"]))

    commands = [line.split("#")[0].split() for line in _code_blocks(section, "bash")[0].strip().splitlines()]
    assert [c[:2] for c in commands] == [[".venv/bin/fedlora", "export"]] * 3
    stems = {"runs/20261122-101500-flora": runs["flora"], "runs/20261122-101500-fedsa_lora": runs["fedsa_lora"]}
    for cmd in commands:
        args = [str(stems.get(a, a)) if a.startswith("runs/") else a for a in cmd[2:]]
        args[1] = str(tmp_path / args[1])
        assert main(["export", *args]) == 0
    scope: dict = {}
    exec(export_code.replace('"exported', f'"{tmp_path}/exported'), scope)
    want = _logits(*load_trained(runs["flora"]))
    torch.testing.assert_close(_logits(scope["model"].eval(), scope["tokenizer"]), want, rtol=ATOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_default_model_adapter_names_its_hub_id_and_loads_offline(tmp_path, monkeypatch) -> None:
    from fedlora import RunConfig

    cfg = RunConfig(
        clients=2, rounds=1, max_examples_per_label=8, progress=False, out_dir=str(tmp_path), run_name="d", threads=1
    )
    result = run(cfg)
    saved = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == DEFAULT_MODEL_HUB_ID
    assert DEFAULT_MODEL_HUB_ID in (result.run_dir / "adapter" / "README.md").read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_trained(result.run_dir)
    assert model.config.id2label[0] == _labels(result.run_dir)[0]
    assert _logits(model, tokenizer).shape == (len(TEXTS), 8)
