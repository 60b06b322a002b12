"""`analyze` and `surface` on checkpoints as frameworks write them, with no user Python.

Real checkpoints of each kind (tests/cli/_frameworks.py): ``save_pretrained`` folders, a
``transformers.Trainer`` output folder, a ``lightning.Trainer`` ``.ckpt``. Each bug of the
user-stack issue has its test here (bug 3: dict batches; bug 6: tied weights; the
threshold from the saved optimizer; bug 8: collapse of a causal LM).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.main import cli

import landscape as ls
from tests.cli import _frameworks as fw
from tests.cli._results import error_line

pytest.importorskip("transformers")
pytest.importorskip("lightning")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("frameworks")
    np.save(root / "ids.npy", fw.token_ids())
    (root / "corpus.txt").write_text(fw.corpus(seed=1))
    return {
        "root": root,
        "trainer": fw.hf_trainer(root / "hf-out"),
        "pretrained": fw.save_pretrained(root / "pretrained"),
        "ckpt": fw.lightning_fit(root / "lit"),
        "ckpt_recorded": fw.lightning_fit(root / "lit-cli", record_class=True),
        "factories": _factories(root),
    }


def _factories(root):
    path = root / "gpt_factories.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(fw.__file__.rsplit('/tests/', 1)[0])!r})
        from tests.cli import _frameworks as fw

        def model():
            return fw.gpt2()

        def data():
            x = fw.blocks(4)
            return {{"input_ids": x, "labels": x}}
    """))
    return path


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


LM = ["--seq-len", "16", "--batch-size", "4"]


def test_trainer_output_folder_analyze_and_surface(stack, tmp_path):
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", stack["trainer"], "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "top_eigenvalues", "-m", "sharpness", "-m", "collapse", "-k", "2",
                      "-o", out])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 checkpoints" in result.stdout
    with ls.Run.open(out) as run:
        assert [s for s, _ in run.checkpoints()] == [2, 4]  # steps from the folders
        assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
        # the threshold comes from checkpoint-N/optimizer.pt: SGD lr 0.05, momentum 0.9
        assert np.allclose(run.series("sharpness", "threshold")[1], (2 + 2 * 0.9) / 0.05)
        assert not [f for f in run.findings() if f.rule == "metric_failed"]
    surface = _invoke(["surface", stack["trainer"], "--text", stack["root"] / "corpus.txt", *LM,
                       "--dims", "1", "--steps", "3", "-o", out])
    assert surface.exit_code == 0, surface.output
    assert "wrote surface 'random-line' (3 points, loss " in surface.stdout
    assert "loss_type" not in surface.stderr  # transformers' notices stay out of the way


def test_bug3_dict_batches_from_factories_use_the_models_loss(stack, tmp_path):
    fac = stack["factories"]
    ckpt = stack["pretrained"] / "model.safetensors"
    args = ["--model", f"{fac}:model", "--data", f"{fac}:data", "-o", tmp_path / "r.h5"]
    surface = _invoke(["surface", ckpt, *args, "--steps", "3", "--dims", "1", "-q"])
    assert surface.exit_code == 0, surface.output  # was: cross_entropy_loss() ... traceback
    analyzed = _invoke(["analyze", ckpt, *args, "-m", "top_eigenvalues", "-k", "1", "-q"])
    assert analyzed.exit_code == 0, analyzed.output
    assert "use closure" not in analyzed.stderr
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    named = _invoke(["analyze", ckpt, *args, "--loss", "cross_entropy", "-q"])
    error_line(named, "dict batches")


def test_bug6_a_tied_weight_safetensors_file_loads(stack, tmp_path):
    from safetensors.torch import load_file

    from landscape.loading import Checkpoint, load_state_into

    path = stack["pretrained"] / "model.safetensors"
    assert "lm_head.weight" not in load_file(str(path))  # saved once, as wte
    model = fw.gpt2(seed=1)
    load_state_into(model, Checkpoint(path, dict(load_file(str(path))), None))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, load_file(str(path))["transformer.wte.weight"])
    fac = stack["factories"]
    result = _invoke(["analyze", path, "--model", f"{fac}:model", "--data", f"{fac}:data",
                      "-m", "representation", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output  # was: missing: lm_head.weight


def test_a_pytorch_model_bin_folder(stack, tmp_path):
    folder = fw.save_pretrained(tmp_path / "bin", safe=False)
    assert (folder / "pytorch_model.bin").is_file()
    result = _invoke(["analyze", folder, "--text", stack["root"] / "corpus.txt", *LM,
                      "-m", "representation", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output


def test_a_folder_saved_in_bfloat16_is_analyzed_in_float32(stack, tmp_path):
    """transformers 5 builds a folder in its saved dtype: a bfloat16 folder was analyzed
    in bfloat16 (λ_max 0.4 % off, a jagged surface), where transformers 4 read it in
    float32. Its values are exact in float32: the same numbers as the float32 folder's."""
    from landscape.checkpoints.huggingface import build_model

    folder = fw.save_pretrained(tmp_path / "f32")
    model = build_model(folder)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    fw.tokenizer().save_pretrained(tmp_path / "bf16")
    rebuilt = build_model(tmp_path / "bf16")
    assert {p.dtype for p in rebuilt.parameters()} == {torch.float32}
    rounded = model.to(torch.bfloat16).float().state_dict()
    assert all(torch.equal(v, rounded[k]) for k, v in rebuilt.state_dict().items())


@pytest.mark.parametrize("how", ["model_class", "recorded_class"])
def test_lightning_ckpt_analyze_and_surface(stack, tmp_path, how):
    ckpt = stack["ckpt"] if how == "model_class" else stack["ckpt_recorded"]
    model = ["--model", "tests.cli._frameworks:LitGPT"] if how == "model_class" else []
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", ckpt, *model, "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "sharpness", "-o", out])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert [s for s, _ in run.checkpoints()] == [4]  # global_step
        # from optimizer_states: SGD lr 0.1, momentum 0.9 (LitGPT's hyper-parameters)
        assert np.allclose(run.series("sharpness", "threshold")[1], (2 + 2 * 0.9) / 0.1)
        assert np.isfinite(run.series("sharpness", "lambda_max")[1]).all()
    surface = _invoke(["surface", ckpt, *model, "--tokens", stack["root"] / "ids.npy", *LM,
                       "--dims", "1", "--steps", "3", "-o", out, "-q"])
    assert surface.exit_code == 0, surface.output


def test_a_folder_of_lightning_checkpoints(stack, tmp_path):
    import shutil

    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(stack["ckpt_recorded"], folder / "step=4.ckpt")
    shutil.copy(stack["ckpt_recorded"], folder / "last.ckpt")  # the same step again
    result = _invoke(["analyze", folder, "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "representation", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert run.checkpoints() == [(4, str(folder / "step=4.ckpt"))]


def test_lightning_ckpt_without_a_class_asks_for_model(stack):
    result = _invoke(["analyze", stack["ckpt"], "--tokens", stack["root"] / "ids.npy", *LM])
    error_line(result, "--model package.module:LitClass")


def test_adamw_trainer_checkpoints_give_the_preconditioned_sharpness(stack, tmp_path):
    out_dir = fw.hf_trainer(tmp_path / "adam-out", steps=12, save_steps=12, adamw=True)
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", out_dir, "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "sharpness", "-k", "1", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "does not match" not in result.stderr  # the saved moments were matched
    with ls.Run.open(out) as run:
        # Adam: (2 + 2 beta1) / ((1 - beta1) lr), Cohen et al. 2022, from optimizer.pt
        assert np.allclose(run.series("sharpness", "threshold")[1], 3.8 / (0.1 * 1e-3))
        assert np.isfinite(run.series("sharpness", "lambda_max")[1]).all()


def test_lr_on_the_command_line_wins_over_the_saved_optimizer(stack, tmp_path):
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", stack["trainer"], "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "sharpness", "--lr", "0.5", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert np.allclose(run.series("sharpness", "threshold")[1], 2 / 0.5)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seq-len", "16"], "give the data"),
        (["--tokens", "IDS", "--text", "TEXT"], "not --tokens and --text"),
        (["--tokens", "BIG"], "outside the model's vocabulary of 100"),
        (["--tokens", "IDS", "--seq-len", "100000"], "fewer than one sequence"),
        (["--tokens", "FLOAT"], "integer token ids"),
        (["--tokens", "MISSING"], "no such token file"),
    ],
)
def test_bad_language_model_data_is_one_line(stack, tmp_path, args, fragment):
    root = stack["root"]
    np.save(tmp_path / "big.npy", np.arange(1000))
    np.save(tmp_path / "float.npy", np.ones(100))
    names = {"IDS": root / "ids.npy", "TEXT": root / "corpus.txt", "BIG": tmp_path / "big.npy",
             "FLOAT": tmp_path / "float.npy", "MISSING": tmp_path / "none.npy"}
    args = [names.get(a, a) for a in args]
    result = _invoke(["analyze", stack["trainer"], *args, "-o", tmp_path / "r.h5"])
    error_line(result, fragment)
    assert not (tmp_path / "r.h5").exists()


def test_a_folder_that_holds_no_checkpoint_is_one_line(stack, tmp_path):
    result = _invoke(["analyze", tmp_path, "--tokens", stack["root"] / "ids.npy"])
    error_line(result, "neither a Hugging Face model folder")


def test_bug8_collapse_of_a_causal_lm_labels_each_position_by_its_next_token(stack):
    from landscape import functional as LF

    model = fw.gpt2()
    x = fw.blocks(4)
    batch = {"input_ids": x, "labels": x}
    with ls.Run.open(_monitor_row(model, batch)) as run:
        got = run.series("collapse", "nc1")[1][-1]
    feats = {}
    def keep(module, inputs, output):
        feats["h"] = inputs[0]

    hook = model.lm_head.register_forward_hook(keep)
    with torch.no_grad():
        model.eval()(**batch)
    hook.remove()
    h = feats["h"][:, :-1].reshape(-1, 32)
    expected = LF.neural_collapse(h, x[:, 1:].reshape(-1), classifier=model.lm_head).as_dict()
    unshifted = LF.neural_collapse(feats["h"].reshape(-1, 32), x.reshape(-1),
                                   classifier=model.lm_head).as_dict()
    assert math.isclose(got, expected["nc1"], rel_tol=1e-5)
    assert not math.isclose(got, unshifted["nc1"], rel_tol=1e-3)


def _monitor_row(model, batch):
    import tempfile

    from landscape.loading import model_loss

    path = tempfile.mktemp(suffix=".h5")
    with ls.Monitor(model, closure=model_loss, path=path, metrics=["collapse"],
                    probe=batch, strict=True) as mon:
        mon.step(0)
    return path


def test_text_with_a_folder_without_tokenizer_says_so(stack, tmp_path):
    """transformers 5 builds a tokenizer of special tokens alone for such a folder: the
    error names the missing tokenizer, not an empty encoding."""
    folder = fw.save_pretrained(tmp_path / "m")
    for f in folder.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    result = _invoke(["analyze", folder, "--text", stack["root"] / "corpus.txt", *LM,
                      "-o", tmp_path / "r.h5"])
    error_line(result, "no usable tokenizer for --text")


def test_text_that_is_not_utf8_is_one_line(stack, tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe binary \x00\x81")
    result = _invoke(["analyze", stack["pretrained"], "--text", tmp_path / "bin.txt", *LM,
                      "-o", tmp_path / "r.h5"])
    error_line(result, "not UTF-8 text")  # was a UnicodeDecodeError traceback


def test_a_trainer_folder_with_a_final_save_model_keeps_its_checkpoints(stack, tmp_path):
    """trainer.save_model() writes config.json and the weights into the output folder: it
    was then read as one model of unknown step, and every checkpoint-N/ was left out."""
    import json
    import shutil

    from landscape.checkpoints.sources import expand, open_checkpoints

    out = tmp_path / "step_5000"  # a name that gives a step: only trainer_state.json dates it
    shutil.copytree(stack["trainer"], out)
    for f in (stack["trainer"] / "checkpoint-4").iterdir():  # what save_model() writes
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, out / f.name)
    with pytest.warns(UserWarning, match="left out, only its checkpoint-N/ folders are read"):
        assert [p.name for p in expand([out])] == ["checkpoint-2", "checkpoint-4"]
    # with trainer.save_state() the final weights have a step: after the last checkpoint
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    assert [p.name for p in expand([out])] == ["checkpoint-2", "checkpoint-4", "step_5000"]
    assert [c.step for c in open_checkpoints([out]).checkpoints] == [2, 4, 5]


def test_save_pretrained_folders_named_by_step_are_read_in_step_order(stack, tmp_path):
    """step-200/ and step-100/ were numbered 0 and 1 in the order given."""
    import shutil

    from landscape.checkpoints.huggingface import folder_step

    assert folder_step(tmp_path / "epoch_3") is None  # epochs are no steps

    for step in (100, 200):
        shutil.copytree(stack["pretrained"], tmp_path / f"step-{step}")
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", tmp_path / "step-200", tmp_path / "step-100", "--tokens",
                      stack["root"] / "ids.npy", *LM, "-m", "collapse", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert [(s, p.rsplit("/", 1)[-1]) for s, p in run.checkpoints()] == [
            (100, "step-100"), (200, "step-200")]


def test_a_seq_len_beyond_the_models_positions_is_one_line(stack, tmp_path):
    """'the model or loss fails on the data: index out of range in self' before."""
    limit = fw.gpt2().config.n_positions
    result = _invoke(["analyze", stack["pretrained"], "--tokens", stack["root"] / "ids.npy",
                      "--seq-len", limit + 1, "-o", tmp_path / "r.h5"])
    error_line(result, f"--seq-len {limit + 1} is longer than the model's {limit} positions")
    # checked before the data are cut: no warning about sequences it could never use
    many = _invoke(["analyze", stack["pretrained"], "--tokens", stack["root"] / "ids.npy",
                    "--seq-len", limit + 1, "--batch-size", 1000, "-o", tmp_path / "r.h5"])
    error_line(many, f"--seq-len {limit + 1} is longer than the model's {limit} positions")
    assert "fewer than" not in many.output


def test_only_a_learned_position_table_limits_the_sequence_length():
    """Rotary positions (Llama) take sequences past max_position_embeddings: not refused."""
    import transformers

    from landscape.checkpoints.sources import _max_positions

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=32))
    assert _max_positions(llama) is None
    ids = torch.randint(0, 100, (1, 64))
    assert llama(input_ids=ids).logits.shape == (1, 64, 100)  # it runs
    assert _max_positions(fw.gpt2()) == fw.gpt2().config.n_positions
    # a vocabulary as large as the context (64 and 64, examples/posthoc_huggingface.py's
    # model): the position table still limits it; Llama's 32-token vocabulary does not
    square = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    assert _max_positions(square) == 64
    llama32 = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=32, max_position_embeddings=32))
    assert _max_positions(llama32) is None


def test_more_batches_than_the_data_hold_is_said(stack, tmp_path):
    """--batches 1000 used the sequences there were, silently."""
    result = _invoke(["analyze", stack["pretrained"], "--tokens", stack["root"] / "ids.npy",
                      *LM, "--batches", 1000, "-m", "collapse", "-o", tmp_path / "r.h5",
                      "-q"])
    assert result.exit_code == 0, result.output
    assert "fewer than --batches 1000 x --batch-size 4" in result.stderr


def test_a_2d_token_array_of_short_rows_needs_no_seq_len(stack, tmp_path):
    """Rows of 16 tokens with the default --seq-len 128 were an error."""
    rows = np.asarray(fw.token_ids()[: 8 * 16]).reshape(8, 16)
    np.save(tmp_path / "rows.npy", rows)
    out = tmp_path / "r.h5"
    result = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / "rows.npy",
                      "--batch-size", 4, "-m", "collapse", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    assert ls.Run.open(out).steps("collapse").size == 1
    assert "pad-id" not in result.stderr  # rows of text do not look padded


_LIT_NORM = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn
    import lightning.pytorch as pl

    class LitNorm(pl.LightningModule):
        def __init__(self, mean: float = 2.0, std: float = 0.25):
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):  # part of the function the weights compute
            return self.net((x - self.hparams.mean) / self.hparams.std)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

    def data():
        g = torch.Generator().manual_seed(1)
        return 2.0 + 0.25 * torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
""")


def test_a_lightning_module_is_analyzed_through_its_own_forward(tmp_path):
    """analyze unwrapped a LightningModule whose parameters all sit in one child and
    analyzed the child: a forward that normalises its inputs was dropped (λ_max 5x off,
    without a word) and one that flattens them failed."""
    import importlib.util

    from landscape.curvature import Hessian, top_eigenvalues

    (tmp_path / "litnorm.py").write_text(_LIT_NORM)
    spec = importlib.util.spec_from_file_location("litnorm", tmp_path / "litnorm.py")
    lit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lit)
    torch.manual_seed(0)
    module = lit.LitNorm()
    torch.save({"state_dict": module.state_dict(), "global_step": 2,
                "hyper_parameters": dict(module.hparams)}, tmp_path / "step=2.ckpt")
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", tmp_path / "step=2.ckpt", "--model",
                      f"{tmp_path / 'litnorm.py'}:LitNorm", "--data",
                      f"{tmp_path / 'litnorm.py'}:data", "-m", "top_eigenvalues", "-k", "1",
                      "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    direct = top_eigenvalues(Hessian(module, torch.nn.functional.cross_entropy, lit.data()),
                             k=1, tol=1e-8).values
    with ls.Run.open(out) as run:
        got = run.series("top_eigenvalues", "eigenvalues")[1][0]
    assert np.allclose(got, direct.numpy(), rtol=1e-3), (got, direct)


def test_a_checkpoint_cannot_name_any_callable_as_its_class(tmp_path):
    """A .ckpt whose hyper-parameters record _class_path 'subprocess.Popen' had it called
    with the file's arguments (touch PWNED), without --trust-checkpoint."""
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"model.weight": torch.zeros(3, 4)}, "global_step": 7,
                "hyper_parameters": {"_class_path": "subprocess.Popen",
                                     "args": ["touch", str(marker)]}}, tmp_path / "evil-7.ckpt")
    (tmp_path / "data.py").write_text("import torch\ndef val():\n    return torch.zeros(4, 4), "
                                      "torch.zeros(4, dtype=torch.long)\n")
    result = _invoke(["analyze", tmp_path / "evil-7.ckpt", "--data", f"{tmp_path / 'data.py'}:val",
                      "-o", tmp_path / "r.h5", "-q"])
    error_line(result, "'subprocess.Popen' is not a LightningModule class")
    assert not marker.exists()
    # nor is a module of the standard library imported (this prints the Zen of Python)
    torch.save({"state_dict": {"model.weight": torch.zeros(3, 4)}, "global_step": 7,
                "hyper_parameters": {"_class_path": "this.s"}}, tmp_path / "zen-7.ckpt")
    zen = _invoke(["analyze", tmp_path / "zen-7.ckpt", "--data", f"{tmp_path / 'data.py'}:val",
                   "-o", tmp_path / "r.h5", "-q"])
    error_line(zen, "'this.s' is not a LightningModule class")
    assert "Zen of Python" not in zen.output


def test_a_lightning_module_passing_its_batch_to_a_hugging_face_model_is_unwrapped():
    """forward(**batch) -> self.model(**batch) around a GPT-2: analyzing the wrapper lost the
    model's own checks (positions, vocabulary) and collapse's next-token labels."""
    import lightning.pytorch as pl

    from landscape.checkpoints.lightning import inner_module

    class LitForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = fw.gpt2()

        def forward(self, **batch):
            return self.model(**batch)

    module = LitForward()
    net, prefix = inner_module(module)
    assert net is module.model and prefix == "model."


def test_a_sharded_folder_and_pt_token_ids_give_the_numbers_of_the_whole_one(stack, tmp_path):
    """Untested until the coverage audit: the shards large save_pretrained folders are
    written in, and token ids in a .pt file (documented beside .npy)."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(stack["pretrained"]).save_pretrained(
        sharded, max_shard_size=20_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    torch.save(torch.from_numpy(np.load(stack["root"] / "ids.npy")), tmp_path / "ids.pt")
    values = []
    for folder, ids in ((stack["pretrained"], stack["root"] / "ids.npy"),
                        (sharded, tmp_path / "ids.pt")):
        out = tmp_path / f"{folder.name}.h5"
        result = _invoke(["analyze", folder, "--tokens", ids, *LM, "-m", "top_eigenvalues",
                          "-k", 1, "-o", out, "-q"])
        assert result.exit_code == 0, result.output
        with ls.Run.open(out) as run:
            values.append(run.series("top_eigenvalues", "eigenvalues")[1][-1])
    np.testing.assert_allclose(values[1], values[0], rtol=1e-6)


def _padded_rows(pad: int = 1, n: int = 8, width: int = 16) -> np.ndarray:
    """``n`` rows of the corpus of different lengths (6 to 16), right-padded with ``pad``."""
    ids = fw.token_ids()
    ids = ids[ids != pad]  # the padding id appears nowhere in the text itself
    rows = np.full((n, width), pad, dtype=np.int64)
    for i in range(n):
        length = 6 + (i * 5) % (width - 5)
        rows[i, :length] = ids[i * width: i * width + length]
    return rows


def _lambda_of_one_batch(model, rows, pad):
    """λ_max of transformers' own loss on one batch of all ``rows``: their token mean."""
    from landscape._hf import model_loss

    x = torch.from_numpy(rows)
    batch = {"input_ids": x, "attention_mask": (x != pad).long(),
             "labels": x.masked_fill(x == pad, -100)}
    op = ls.Hessian(model, None, batch, closure=model_loss)
    return float(ls.top_eigenvalues(op, k=1, tol=1e-6).values[0])


def test_padded_token_rows_with_pad_id_give_the_token_mean_of_one_batch(stack, tmp_path):
    """A 2-D token array padded to one length (a collator's export) read its padding as text:
    lambda_max 14.5 instead of 7.6 in the audit, without a word. --pad-id leaves the padding
    out of the loss and the attention, and two unequally padded batches weigh by their
    next-token targets, so they give the lambda_max of one batch of all the rows."""
    pad = 1
    rows = _padded_rows(pad)
    np.save(tmp_path / "padded.npy", rows)
    folder = stack["pretrained"]
    common = ["analyze", folder, "--tokens", tmp_path / "padded.npy", "--batch-size", 4,
              "--batches", 2, "-m", "top_eigenvalues", "-k", 1, "-q"]
    masked = _invoke([*common, "--pad-id", pad, "-o", tmp_path / "masked.h5"])
    assert masked.exit_code == 0, masked.output
    assert "unequal shares" not in masked.stderr  # weighed by their targets
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    expected = _lambda_of_one_batch(model.eval(), rows, pad)
    with ls.Run.open(tmp_path / "masked.h5") as run:
        got = run.series("top_eigenvalues", "eigenvalues")[1][0, 0]
    assert got == pytest.approx(expected, rel=1e-4)

    plain = _invoke([*common, "-o", tmp_path / "plain.h5"])
    assert plain.exit_code == 0, plain.output
    assert f"rows end in a run of the id {pad}" in plain.stderr
    assert f"pass --pad-id {pad}" in plain.stderr
    with ls.Run.open(tmp_path / "plain.h5") as run:  # the padding read as text
        assert abs(run.series("top_eigenvalues", "eigenvalues")[1][0, 0] - expected) \
            > 1e-2 * abs(expected)


def test_analyze_weighs_a_causal_lms_padded_batches_by_their_next_token_targets(stack, tmp_path):
    """Two batches padded in unequal shares were averaged by their samples, with a warning
    whose advice (batch_size=...) the command line cannot follow; the Hugging Face callback
    already weighed them by their next-token targets. Now analyze does too: the two batches
    give the lambda_max of one batch of all their rows (transformers' token mean)."""
    import warnings

    from landscape._hf import model_loss
    from landscape.analysis import analyze

    pad = 1
    rows = _padded_rows(pad)
    x = torch.from_numpy(rows)
    batches = [{"input_ids": b, "attention_mask": (b != pad).long(),
                "labels": b.masked_fill(b == pad, -100)} for b in x.split(4)]
    ckpt = stack["pretrained"] / "model.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 'unequal shares' warning
        analyze([ckpt], fw.gpt2, batches, None, tmp_path / "r.h5", metrics=["top_eigenvalues"],
                k=1, progress=False, closure=model_loss)
    from transformers import GPT2LMHeadModel

    expected = _lambda_of_one_batch(GPT2LMHeadModel.from_pretrained(stack["pretrained"]).eval(),
                                    rows, pad)
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert run.series("top_eigenvalues", "eigenvalues")[1][0, 0] == \
            pytest.approx(expected, rel=1e-4)


def test_left_padded_rows_are_said_to_look_padded_and_read_as_right_padded_ones(stack,
                                                                                tmp_path):
    """With --pad-id, left padding shifted every token's absolute position (review: loss
    4.404 where the same rows right-padded give 4.360): it is moved to the end."""
    right = _padded_rows(pad=1)
    left = np.stack([np.roll(r, int((r == 1).sum())) for r in right])  # the padding first
    assert (left[:, 0] == 1).sum() >= 4
    np.save(tmp_path / "left.npy", left)
    np.save(tmp_path / "right.npy", right)
    result = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / "left.npy",
                      "--batch-size", 8, "-m", "collapse", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output
    assert "rows begin in a run of the id 1" in result.stderr and "--pad-id 1" in result.stderr
    lambdas = []
    for name in ("left", "right"):
        out = tmp_path / f"{name}.h5"
        done = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / f"{name}.npy",
                        "--batch-size", 8, "--pad-id", 1, "-m", "top_eigenvalues", "-k", 1,
                        "-o", out, "-q"])
        assert done.exit_code == 0, done.output
        lambdas.append(ls.Run.open(out).series("top_eigenvalues", "eigenvalues")[1][0, 0])
    assert lambdas[0] == pytest.approx(lambdas[1], rel=1e-5)
    # wider than --seq-len: the padding is moved before the rows are cut (review: the cut
    # kept the left padding and dropped the text), and rows left without a target go
    cut = []
    for name in ("left", "right"):
        out = tmp_path / f"{name}-cut.h5"
        done = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / f"{name}.npy",
                        "--batch-size", 8, "--pad-id", 1, "--seq-len", 7, "-m",
                        "top_eigenvalues", "-k", 1, "-o", out, "-q"])
        assert done.exit_code == 0, done.output
        cut.append(ls.Run.open(out).series("top_eigenvalues", "eigenvalues")[1][0, 0])
    assert cut[0] == pytest.approx(cut[1], rel=1e-5)
    from landscape.checkpoints.tokens import token_batches

    (batch,) = token_batches(tokens=tmp_path / "left.npy", seq_len=7, batch_size=8, pad_id=1)
    real = np.minimum((right != 1).sum(1), 7)  # each row's first tokens, up to --seq-len
    assert batch["attention_mask"].sum(1).tolist() == real.tolist()


def test_an_id_that_ends_many_rows_but_stands_mostly_inside_them_is_text(stack, tmp_path):
    """Lines of code end in runs of spaces that are text (review: 19 of 64 byte-level rows
    said to look padded with the space's id)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(2, 40, size=(16, 16))
    rows[rng.random(rows.shape) < 0.3] = 5  # the 'space': everywhere in the rows
    rows[::2, -3:] = 5  # and ending half of them
    np.save(tmp_path / "code.npy", rows)
    result = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / "code.npy",
                      "--batch-size", 8, "-m", "collapse", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output
    assert "pad-id" not in result.stderr


def test_moved_batch_helpers_still_import_from_the_context_module_with_a_warning():
    from landscape.metrics import batch_parts

    with pytest.warns(DeprecationWarning, match="landscape.metrics.batch_parts.softmax_logits"):
        from landscape.metrics.context import softmax_logits
    assert softmax_logits is batch_parts.softmax_logits
    with pytest.warns(DeprecationWarning, match="batch_parts.without_labels"):
        from landscape.metrics.context import without_labels
    assert without_labels is batch_parts.without_labels


def test_pad_id_goes_with_token_rows_only(stack, tmp_path):
    fac = stack["factories"]
    with_data = _invoke(["analyze", stack["pretrained"], "--model", f"{fac}:model", "--data",
                         f"{fac}:data", "--pad-id", 1, "-o", tmp_path / "r.h5"])
    assert with_data.exit_code == 2 and "--pad-id: for --tokens and --text data only" \
        in with_data.output
    with_text = _invoke(["analyze", stack["pretrained"], "--text", stack["root"] / "corpus.txt",
                         "--pad-id", 1, "-o", tmp_path / "r.h5"])
    error_line(with_text, "--pad-id: for --tokens data only")
    everything = np.ones((4, 8), dtype=np.int64)
    np.save(tmp_path / "ones.npy", everything)
    all_padding = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / "ones.npy",
                           "--pad-id", 1, "-o", tmp_path / "r.h5"])
    error_line(all_padding, "no row holds two tokens besides the padding id 1")
    stream = _invoke(["analyze", stack["pretrained"], "--tokens", stack["root"] / "ids.npy",
                      *LM, "--pad-id", 1, "-o", tmp_path / "r.h5"])
    error_line(stream, "is a stream of tokens, which has no padding")
    np.save(tmp_path / "column.npy", np.full((3, 1), 7, dtype=np.int64))
    column = _invoke(["analyze", stack["pretrained"], "--tokens", tmp_path / "column.npy",
                      "-o", tmp_path / "r.h5"])  # its loss was NaN
    error_line(column, "rows of 1 token(s): a language model needs two to predict one")


def test_token_batches_for_a_model_that_is_not_a_causal_lm_are_refused(stack, tmp_path):
    """A sequence classifier failed on them with torch's 'Expected input batch_size (8) to
    match target batch_size (240)'."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=fw.VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        pad_token_id=1, num_labels=3)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    result = _invoke(["analyze", tmp_path / "classifier", "--tokens",
                      stack["root"] / "ids.npy", *LM, "-o", tmp_path / "r.h5"])
    error_line(result, "GPT2ForSequenceClassification is a head that takes labels of its "
                       "own; give its batches with --data")
    from transformers import BertConfig, BertForMaskedLM, BertForNextSentencePrediction

    bert = BertConfig(vocab_size=fw.VOCAB, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32)
    for cls, kind in ((BertForNextSentencePrediction, "a head that takes labels"),
                      (BertForMaskedLM, "a masked LM, which learns from masked inputs")):
        cls(bert).save_pretrained(tmp_path / cls.__name__)
        refused = _invoke(["analyze", tmp_path / cls.__name__, "--tokens",
                           stack["root"] / "ids.npy", *LM, "-o", tmp_path / "r.h5"])
        error_line(refused, f"{cls.__name__} is {kind}")


def test_token_batches_for_a_causal_lm_whose_loss_does_not_shift_are_refused(stack, tmp_path):
    """XLNet's LM head is mapped to causal language modelling but computes its own loss on
    unshifted labels: with the ids as labels it was the loss of copying each token, and
    analyze measured its curvature without a word."""
    from transformers import XLNetConfig, XLNetLMHeadModel

    XLNetLMHeadModel(XLNetConfig(vocab_size=fw.VOCAB, d_model=16, n_layer=1, n_head=2,
                                 d_inner=32)).save_pretrained(tmp_path / "xlnet")
    result = _invoke(["analyze", tmp_path / "xlnet", "--tokens", stack["root"] / "ids.npy",
                      *LM, "-o", tmp_path / "r.h5"])
    error_line(result, "--tokens: these batches pass the ids as the labels, and "
                       "XLNetLMHeadModel's own loss does not shift them")
    assert not (tmp_path / "r.h5").exists()


def test_the_unshifted_loss_check_reads_the_loss_not_the_class():
    """A causal LM whose loss function was replaced on the instance (so the class's code
    says nothing) passes when its loss shifts, and is refused when it does not; a closure
    of the user's own is never checked."""
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from landscape._errors import LandscapeError
    from landscape._hf import model_loss
    from landscape.checkpoints.sources import refuse_unshifted_loss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=fw.VOCAB, n_positions=32, n_embd=16,
                                       n_layer=1, n_head=2))
    ids = torch.randint(0, fw.VOCAB, (3, 10))
    batches = [{"input_ids": ids, "labels": ids.clone()}]
    shifting = model.loss_function
    model._loss_function = shifting  # replaced on the instance: the class no longer tells
    rng = torch.get_rng_state()
    refuse_unshifted_loss(model, batches, model_loss, "--tokens")
    assert torch.equal(torch.get_rng_state(), rng)

    def unshifted(logits, labels, vocab_size, **kwargs):
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    model._loss_function = unshifted
    with pytest.raises(LandscapeError, match="GPT2LMHeadModel's own loss does not shift"):
        refuse_unshifted_loss(model, batches, model_loss, "--text")
    refuse_unshifted_loss(model, batches, lambda m, b: m(**b).loss, "--tokens")


def test_a_subclass_of_a_causal_lm_reads_token_batches(stack, tmp_path):
    """The refusal compared the class's name with transformers' causal-LM list: a subclass
    (a custom or remote-code class) that had worked was refused (review)."""
    fac = tmp_path / "sub.py"
    fac.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(fw.__file__.rsplit('/tests/', 1)[0])!r})
        from transformers import GPT2LMHeadModel
        from tests.cli import _frameworks as fw

        class MyGPT(GPT2LMHeadModel):
            pass

        def model():
            return MyGPT(fw.gpt2().config)
    """))
    result = _invoke(["analyze", stack["pretrained"] / "model.safetensors", "--model",
                      f"{fac}:model", "--tokens", stack["root"] / "ids.npy", *LM,
                      "-m", "collapse", "-o", tmp_path / "r.h5", "-q"])
    assert result.exit_code == 0, result.output


def test_a_class_a_language_model_mapping_lists_reads_token_batches_whatever_else_lists_it():
    """transformers lists BART among masked LMs and sequence-to-sequence LMs, XLM's LM head
    among masked and causal LMs: refusing masked LMs refused them too (review)."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM

    from landscape.checkpoints.sources import _labelled_head

    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16))
    assert _labelled_head(bart) is None
    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16))
    assert _labelled_head(bert) == "BertForMaskedLM"
