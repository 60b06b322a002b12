"""PEFT (LoRA) adapter folders, as a Hugging Face ``Trainer`` fine-tuning a ``PeftModel`` saves
them: each ``checkpoint-N`` holds the adapters alone, the base model stays where it was.

They were refused ("whose weights alone are not a model: save the merged model"): a LoRA
run's checkpoints could not be analyzed at all without glue code.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.commands import analyze as _analyze_command  # noqa: F401  (attaches it)
from landscape_cli.commands import surface as _surface_command  # noqa: F401
from landscape_cli.main import cli

import landscape as ls
from landscape.checkpoints import adapters, open_checkpoints, token_batches
from landscape.isolation import sdpa_math
from landscape.loading import load_state_into
from tests.cli import _frameworks as fw
from tests.cli._results import error_line

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LM = ["--seq-len", "16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    np.save(root / "ids.npy", fw.token_ids())
    base = fw.save_pretrained(root / "base")
    out = fw.lora_trainer(root / "out", base, steps=24, save_steps=12)
    factories = root / "lora_factories.py"
    factories.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(fw.__file__.rsplit('/tests/', 1)[0])!r})
        from transformers import GPT2LMHeadModel
        from tests.cli import _frameworks as fw

        def base():
            return GPT2LMHeadModel.from_pretrained({str(base)!r})

        def lora_model():
            return fw.lora(base())

        def wider_lora():
            return fw.lora(base(), r=4)
    """))
    return {"root": root, "base": base, "out": out, "factories": factories}


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _reference(run, checkpoint):
    """The PEFT model of ``checkpoint`` as PEFT itself loads it."""
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    return PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(run["base"])),
                                     str(checkpoint), is_trainable=True).eval()


def test_a_lora_trainer_folder_loads_as_peft_loads_it(lora_run):
    opened = open_checkpoints([lora_run["out"]])
    assert [c.step for c in opened.checkpoints] == [12, 24]
    assert opened.kinds == {"peft"} and all(c.partial for c in opened.checkpoints)
    assert opened.folder == lora_run["base"]  # the tokenizer for --text: the base model's
    trained = {n for n, p in opened.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    for ckpt in opened.checkpoints:
        load_state_into(opened.model, ckpt)
        ours, theirs = opened.model.state_dict(), _reference(lora_run, ckpt.path).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), ckpt.path
    # the two checkpoints differ in their adapters only
    first, last = (_reference(lora_run, c.path).state_dict() for c in opened.checkpoints)
    assert {k for k in first if not torch.equal(first[k], last[k])} <= trained


def _dense_lambda_max(model, batch):
    """The largest eigenvalue of the loss's Hessian in the adapters, dense, in float64."""
    model = model.double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([params[n].reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss(v):
        chunks = dict(zip(names, (c.view_as(params[n]) for c, n in
                                  zip(torch.split(v, sizes), names))))
        return torch.func.functional_call(model, {**params, **chunks}, (), batch).loss

    with sdpa_math():  # the fused CPU attention has no forward-mode derivative
        hessian = torch.func.hessian(loss)(flat)
    return float(torch.linalg.eigvalsh(hessian)[-1])


def test_analyze_a_lora_trainer_folder_by_default(lora_run, tmp_path):
    """The default invocation, no --model: the base model the adapter config names."""
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", lora_run["out"], "--tokens", lora_run["root"] / "ids.npy",
                      *LM, "-o", out])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 checkpoints" in result.stdout
    with ls.Run.open(out) as run:
        steps, eig = run.series("top_eigenvalues", "eigenvalues")
        # the Trainer's AdamW state was read: the preconditioned sharpness of step 24 (step
        # 12 is within the default adam_warmup of 10 steps... of the saved state's count)
        ratio = run.series("sharpness", "ratio")[1]
        assert not [f for f in run.findings() if f.rule == "metric_failed"]
    assert list(steps) == [12, 24] and np.isfinite(ratio[-1])
    batch = token_batches(tokens=lora_run["root"] / "ids.npy", seq_len=16, batch_size=4)[0]
    for step, top in zip(steps, eig[:, 0]):
        dense = _dense_lambda_max(_reference(lora_run, lora_run["out"] / f"checkpoint-{step}"),
                                  {k: v for k, v in batch.items()})
        assert top == pytest.approx(dense, rel=1e-5), step


def _eigenvalues_of_checkpoint_24(lora_run, out, *extra):
    """The top-2 eigenvalues ``analyze`` records for checkpoint-24 (``extra``: options)."""
    result = _invoke(["analyze", lora_run["out"] / "checkpoint-24", "--tokens",
                      lora_run["root"] / "ids.npy", *LM, "-m", "top_eigenvalues", "-k", "2",
                      *extra, "-o", out])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        return run.series("top_eigenvalues", "eigenvalues")[1]


@pytest.mark.parametrize("factory", ["base", "lora_model"])
def test_a_model_factory_gives_the_base_or_the_peft_model(lora_run, tmp_path, factory):
    """--model may build the base model (the adapters go on it) or the PEFT model itself."""
    default = _eigenvalues_of_checkpoint_24(lora_run, tmp_path / "default.h5")
    given = _eigenvalues_of_checkpoint_24(lora_run, tmp_path / f"{factory}.h5", "--model",
                                          f"{lora_run['factories']}:{factory}")
    np.testing.assert_allclose(given, default, rtol=1e-6)


def test_a_base_model_that_is_not_local_is_one_line_naming_model(lora_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"] / "checkpoint-24", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"  # a Hub id: never downloaded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = _invoke(["analyze", adapter, "--tokens", lora_run["root"] / "ids.npy", *LM,
                      "-m", "sharpness", "-o", tmp_path / "r.h5"])
    error_line(result, "'openai-community/gpt2' is not a local model folder", "--model")
    assert not (tmp_path / "r.h5").exists()


def test_adapters_of_another_rank_are_one_line(lora_run, tmp_path):
    result = _invoke(["analyze", lora_run["out"], "--tokens", lora_run["root"] / "ids.npy", *LM,
                      "--model", f"{lora_run['factories']}:wider_lora", "-m", "sharpness",
                      "-o", tmp_path / "r.h5"])
    error_line(result, "saved with another configuration", "r 2 (the model: 4)")


def test_adapters_on_a_model_they_were_not_made_for_are_one_line(lora_run, tmp_path):
    factories = tmp_path / "f.py"
    factories.write_text("import torch\n\ndef model():\n"
                         "    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n")
    result = _invoke(["analyze", lora_run["out"], "--tokens", lora_run["root"] / "ids.npy", *LM,
                      "--model", f"{factories}:model", "-m", "sharpness",
                      "-o", tmp_path / "r.h5"])
    error_line(result, "the adapters do not fit the base model")


def test_surface_of_a_lora_checkpoint_moves_the_adapters(lora_run, tmp_path):
    out = tmp_path / "s.h5"
    result = _invoke(["surface", lora_run["out"] / "checkpoint-24", "--tokens",
                      lora_run["root"] / "ids.npy", *LM, "--steps", "3", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        surf = run.surface(run.surfaces()[0])
    values = surf.values["loss"]
    assert np.all(np.isfinite(values)) and np.ptp(values) > 0


def test_an_adapter_named_otherwise_in_the_factory_loads(lora_run):
    """PEFT saves no adapter name; a factory's PEFT model may call its adapter anything."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(str(lora_run["base"]))
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                        fan_in_fan_out=True)
    model = get_peft_model(base, config, adapter_name="mine")
    ckpt = open_checkpoints([lora_run["out"] / "checkpoint-24"]).checkpoints[0]
    ckpt.rename(adapters.model_keys(model))
    load_state_into(model, ckpt)
    ours = {k.replace(".mine.", ".default."): v for k, v in model.state_dict().items()}
    theirs = _reference(lora_run, ckpt.path).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------- from the PEFT workflow audit


def _copy_run(lora_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(lora_run["out"], out)
    return out


def _adapter_files(folder):
    return [folder / name for name in ("adapter_config.json", "adapter_model.safetensors")]


def test_a_final_save_model_of_the_adapters_does_not_hide_the_checkpoints(lora_run, tmp_path):
    """trainer.save_model() writes the adapters into the output folder itself: that folder
    was read as one adapter folder, step 0, its checkpoint-N/ left out without a word."""
    out = _copy_run(lora_run, tmp_path)
    for f in _adapter_files(out / "checkpoint-24"):
        shutil.copy(f, out / f.name)
    with pytest.warns(UserWarning, match="saved in the folder itself"):
        assert [c.step for c in open_checkpoints([out]).checkpoints] == [12, 24]
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 30}))  # save_state()
    assert [c.step for c in open_checkpoints([out]).checkpoints] == [12, 24, 30]


def test_a_named_adapter_reads_its_step_and_optimizer_from_its_checkpoint(lora_run, tmp_path):
    """get_peft_model(..., adapter_name="task") saves checkpoint-N/task/: the output folder
    was refused, and the subfolders numbered 0, 1 without their optimizer.pt."""
    out = _copy_run(lora_run, tmp_path)
    for ckpt in ("checkpoint-12", "checkpoint-24"):
        (out / ckpt / "task").mkdir()
        for f in _adapter_files(out / ckpt):
            f.rename(out / ckpt / "task" / f.name)
    opened = open_checkpoints([out])
    assert [(c.step, c.path.name) for c in opened.checkpoints] == [(12, "task"), (24, "task")]
    assert all(c.optimizer for c in opened.checkpoints)  # the Trainer's AdamW state
    # a final save_model() of the named adapter: out/task/, dated by trainer_state.json
    shutil.copytree(out / "checkpoint-24" / "task", out / "task")
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 30}))
    assert [c.step for c in open_checkpoints([out]).checkpoints] == [12, 24, 30]
    reference = open_checkpoints([lora_run["out"] / "checkpoint-24"])
    load_state_into(opened.model, opened.checkpoints[1])
    load_state_into(reference.model, reference.checkpoints[0])
    ours, theirs = opened.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_several_adapters_in_a_checkpoint_say_which_one_is_read(lora_run, tmp_path):
    out = _copy_run(lora_run, tmp_path)
    for ckpt in ("checkpoint-12", "checkpoint-24"):
        shutil.copytree(out / ckpt, out / ckpt / "other",
                        ignore=lambda d, names: [n for n in names if not n.startswith("adapter")])
    with pytest.warns(UserWarning, match=r"several PEFT adapters \(default, other\).*"
                                         r"checkpoint-\*/other for another") as caught:
        opened = open_checkpoints([out])
    assert len([w for w in caught if "several PEFT" in str(w.message)]) == 1  # one line
    assert [c.path.name for c in opened.checkpoints] == ["checkpoint-12", "checkpoint-24"]
    named = open_checkpoints([out / "checkpoint-12" / "other", out / "checkpoint-24" / "other"])
    assert [c.step for c in named.checkpoints] == [12, 24]


def test_adapters_of_another_scale_in_one_call_are_refused(lora_run, tmp_path):
    """Two runs' adapter folders with another lora_alpha: the second was loaded into the
    first's model (scale 4/2 instead of 16/2), silently."""
    other = tmp_path / "alt" / "checkpoint-30"
    shutil.copytree(lora_run["out"] / "checkpoint-24", other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora_alpha"] = 16
    (other / "adapter_config.json").write_text(json.dumps(config))
    result = _invoke(["analyze", lora_run["out"] / "checkpoint-12", other, "--tokens",
                      lora_run["root"] / "ids.npy", *LM, "-m", "sharpness",
                      "-o", tmp_path / "r.h5"])
    error_line(result, "saved with another configuration", "lora_alpha 16 (the model: 4)")


def test_a_frozen_peft_model_from_the_factory_is_one_line(lora_run, tmp_path):
    factories = tmp_path / "frozen.py"
    factories.write_text(textwrap.dedent(f"""
        from peft import PeftModel
        from transformers import GPT2LMHeadModel

        def model():
            base = GPT2LMHeadModel.from_pretrained({str(lora_run["base"])!r})
            return PeftModel.from_pretrained(base, {str(lora_run["out"] / "checkpoint-12")!r})
    """))
    for metrics in (["-m", "top_eigenvalues"], ["-m", "sharpness"]):
        result = _invoke(["analyze", lora_run["out"], "--tokens", lora_run["root"] / "ids.npy",
                          *LM, "--model", f"{factories}:model", *metrics,
                          "-o", tmp_path / "r.h5"])
        error_line(result, "adapters are frozen", "is_trainable=True")


def test_adapters_mixed_with_a_whole_model_are_one_line(lora_run, tmp_path):
    merged = tmp_path / "step-30"
    _reference(lora_run, lora_run["out"] / "checkpoint-24").merge_and_unload() \
        .save_pretrained(merged)
    result = _invoke(["analyze", lora_run["out"], merged, "--tokens",
                      lora_run["root"] / "ids.npy", *LM, "-m", "sharpness",
                      "-o", tmp_path / "r.h5"])
    error_line(result, "cannot be analyzed with whole-model checkpoints")


def test_collapse_of_a_lora_causal_lm_equals_the_merged_models(lora_run, tmp_path):
    """A PEFT causal LM was not taken for one: collapse labelled position t with token t
    instead of t + 1 (nc1 0.16 against the merged model's 0.52 in the audit)."""
    merged = tmp_path / "merged" / "step-24"
    _reference(lora_run, lora_run["out"] / "checkpoint-24").merge_and_unload() \
        .save_pretrained(merged)
    values = []
    for ckpt in (lora_run["out"] / "checkpoint-24", merged):
        out = tmp_path / f"{ckpt.parent.name}.h5"
        result = _invoke(["analyze", ckpt, "--tokens", lora_run["root"] / "ids.npy", *LM,
                          "-m", "collapse", "-o", out, "-q"])
        assert result.exit_code == 0, result.output
        with ls.Run.open(out) as run:
            values.append([run.series("collapse", f)[1][0] for f in ("nc1", "nc4")])
    np.testing.assert_allclose(values[0], values[1], rtol=1e-4)


def test_a_partial_checkpoint_refuses_weights_the_model_does_not_train():
    """Adapters hold what training moved: one landing in a frozen parameter (a head saved
    as modules_to_save into a model built without it) would be measured as a constant."""
    from landscape._errors import LandscapeError
    from landscape.loading import Checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].requires_grad_(False)
    ckpt = Checkpoint(None, {"0.weight": torch.zeros(3, 4), "1.weight": torch.zeros(2, 3)}, 1,
                      partial=True)
    with pytest.raises(LandscapeError, match=r"trained but frozen in the model: 1\.weight"):
        load_state_into(model, ckpt)
    # what the model does not train may be left out, and keeps its values
    frozen = model[1].weight.detach().clone()
    trained = {"0.weight": torch.zeros(3, 4), "0.bias": torch.ones(3)}
    load_state_into(model, Checkpoint(None, trained, 1, partial=True))
    assert torch.equal(model[0].bias, torch.ones(3)) and torch.equal(model[1].weight, frozen)


def test_a_peft_causal_lm_is_one_for_the_metrics_and_the_trainer_callback(lora_run):
    """PeftModelForCausalLM passes the batch to the GPT-2 it wraps, whose loss is the
    shifted next-token mean: collapse's next-token labels and the Trainer callback's
    next_token_targets batch sizes depend on seeing it (they did not)."""
    from landscape._hf import is_causal_lm, uses_causal_lm_loss

    model = _reference(lora_run, lora_run["out"] / "checkpoint-24")
    assert is_causal_lm(model) and uses_causal_lm_loss(model)
    assert not is_causal_lm(torch.nn.Linear(2, 2))


def test_interpolating_two_lora_checkpoints_moves_the_adapters_alone(lora_run, tmp_path):
    """The stored direction covered every weight of the base model (zeros but for the
    adapters), and the command kept a copy of the whole model per checkpoint."""
    out = tmp_path / "s.h5"
    result = _invoke(["surface", lora_run["out"] / "checkpoint-12",
                      lora_run["out"] / "checkpoint-24", "--directions", "interpolate",
                      "--tokens", lora_run["root"] / "ids.npy", *LM, "--steps", "5", "-o", out,
                      "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        surf = run.surface(run.surfaces()[0])
    model = _reference(lora_run, lora_run["out"] / "checkpoint-24")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert surf.arrays["directions"].shape == (1, trained)
    batch = token_batches(tokens=lora_run["root"] / "ids.npy", seq_len=16, batch_size=4)[0]
    start = _reference(lora_run, lora_run["out"] / "checkpoint-12")
    with torch.no_grad():
        ends = [float(m(**batch).loss) for m in (start, model)]
    x = list(surf.x)
    assert surf.values["loss"][x.index(0.0)] == pytest.approx(ends[0], rel=1e-5)
    assert surf.values["loss"][x.index(1.0)] == pytest.approx(ends[1], rel=1e-5)


def test_text_without_a_tokenizer_to_be_had_says_so(lora_run, tmp_path):
    """Adapters without a tokenizer, on a base named by its Hub id: the error quoted the
    tokenizer library's "Couldn't instantiate the backend tokenizer from one of: "."""
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"] / "checkpoint-24", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "openai-community/gpt2"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(fw.corpus(seed=3))
    result = _invoke(["analyze", adapter, "--model", f"{lora_run['factories']}:base",
                      "--text", corpus, *LM, "-m", "sharpness", "-o", tmp_path / "r.h5"])
    error_line(result, "--text needs the tokenizer", "beside PEFT adapters")


def test_spectral_alignment_leaves_out_the_unused_copy_of_a_saved_head():
    """PEFT keeps the original of a modules_to_save head beside the trained copy and never
    calls it: spectral_alignment recorded NaN for it at every row."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    metric = ls.metrics.SpectralAlignment(schedule=1)
    mon = ls.Monitor(model, torch.nn.functional.cross_entropy, None, optimizer=opt,
                     metrics=[metric], probe=(x, y), warn=False, strict=True).start()
    assert metric.layers and not any("original_module" in n for n in metric.layers)
    assert any("modules_to_save" in n for n in metric.layers)
    for step in range(3):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss)
    rows = mon.run().series("spectral_alignment", "minority")[1]
    mon.close()
    assert np.isfinite(rows).all()


def test_a_task_type_alone_is_no_other_configuration(lora_run, tmp_path):
    """The same adapters as a PeftModelForCausalLM (task_type set; the run saved none)
    compute the same function: they were refused as another configuration."""
    factories = tmp_path / "task.py"
    factories.write_text(textwrap.dedent(f"""
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2LMHeadModel

        def model():
            base = GPT2LMHeadModel.from_pretrained({str(lora_run["base"])!r})
            return get_peft_model(base, LoraConfig(
                r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0,
                fan_in_fan_out=True, task_type="CAUSAL_LM"))
    """))
    default = _eigenvalues_of_checkpoint_24(lora_run, tmp_path / "default.h5")
    given = _eigenvalues_of_checkpoint_24(lora_run, tmp_path / "task.h5", "--model",
                                          f"{factories}:model")
    np.testing.assert_allclose(given, default, rtol=1e-6)
