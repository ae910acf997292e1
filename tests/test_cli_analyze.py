"""``optdiag analyze``: a report on success; exit code 2 and one line, no traceback, for every bad input."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from optdiag import cli
from tests import fixtures_analysis as fx

FX = "tests.fixtures_analysis"
FAST = ["--max-batches", "3", "--resolution", "5", "--surface-resolution", "3", "--top-k", "2"]


@pytest.fixture(autouse=True)
def only_analyze(monkeypatch):
    """Build the parser with the analyze subcommand alone (each layer tests its own subcommand)."""
    monkeypatch.setattr(cli, "_SUBCOMMANDS", {"analyze": cli._SUBCOMMANDS["analyze"]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    return fx.write_lightning_checkpoint(folder / "model.ckpt", hidden=0, weights=fx.target_weights(), steps=1)


def _run(capsys, *argv):
    code = cli.main(["analyze", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """The same net at step 0: a series that starts there has its early-training gradient scale."""
    return fx.write_lightning_checkpoint(tmp_path_factory.mktemp("cli-init") / "init.ckpt", hidden=0, steps=0)


def test_success_writes_both_files_and_prints_a_summary(ckpt, init_ckpt, tmp_path, capsys):
    code, out, err = _run(capsys, ckpt, init_ckpt, "--model", f"{FX}:LinearNet", "--out", str(tmp_path / "r"),
                          *FAST)
    assert code == 0, err
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["step"] for c in data["checkpoints"]] == [0, 1]
    assert data["checkpoints"][1]["point_type"] == "local_minimum"
    assert data["checkpoints"][1]["lambda_max"] == pytest.approx(1.0, abs=1e-4)
    assert data["story"]["final"] == "minimum" and out.startswith("story: ")
    assert (tmp_path / "r" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert "model.ckpt (step 1)" in out and "local minimum" in out and "wrote" in out
    assert "stage" in err  # the progress bar


def test_quiet_prints_nothing_and_out_keeps_existing_files(ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "report.json").write_text("{}")
    code, out, err = _run(capsys, ckpt, "--model", f"{FX}:LinearNet", "--out", str(tmp_path), "--quiet", *FAST)
    assert code == 0 and out == "" and err == ""
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "report.json").read_text() == "{}"
    assert (tmp_path / "report-2.json").exists() and (tmp_path / "report-2.html").exists()


def test_data_and_loss_options(ckpt, tmp_path, capsys):
    code, _, err = _run(capsys, ckpt, "--model", f"{FX}:LinearNet", "--data", f"{FX}:make_datamodule",
                        "--loss", f"{FX}:half_squared_error", "--out", str(tmp_path), "--quiet", *FAST)
    assert code == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["checkpoints"][0]["n_batches"] == 2


def _bad_files(tmp_path):
    """Every kind of bad checkpoint file, by name."""
    files = {}
    files["missing"] = tmp_path / "nope.ckpt"
    files["directory"] = tmp_path
    (tmp_path / "empty.ckpt").write_bytes(b"")
    files["empty"] = tmp_path / "empty.ckpt"
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint\n" * 20)
    files["text"] = tmp_path / "garbage.ckpt"
    (tmp_path / "config.ckpt").write_text('{"lr": 0.1}\n')
    files["json"] = tmp_path / "config.ckpt"
    (tmp_path / "binary.ckpt").write_bytes(bytes(range(256)) * 4)
    files["corrupt"] = tmp_path / "binary.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "whole.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:200])
    files["truncated"] = tmp_path / "truncated.ckpt"
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    files["not a checkpoint"] = tmp_path / "list.ckpt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "nostate.ckpt")
    files["no state dict"] = tmp_path / "nostate.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.ones(4, 3)}}, tmp_path / "shape.ckpt")  # fits (2, 3)
    files["wrong shape"] = tmp_path / "shape.ckpt"
    torch.save({"state_dict": {"other.weight": torch.ones(2, 3)}}, tmp_path / "keys.ckpt")
    files["wrong keys"] = tmp_path / "keys.ckpt"
    torch.save({"state_dict": {"net.0.weight": torch.ones(2, 3)}, "args": argparse.Namespace(a=1)},
               tmp_path / "object.ckpt")
    files["unsafe object"] = tmp_path / "object.ckpt"
    return files


BAD_FILES = {
    "missing": "checkpoint not found",
    "directory": "is a directory",
    "empty": "is empty",
    "text": "is not a PyTorch checkpoint: it is a text file, where torch.save writes a zip archive",
    "json": "is not a PyTorch checkpoint: it is a text file (it looks like JSON)",
    "corrupt": "not a readable PyTorch checkpoint",
    "truncated": "not a readable PyTorch checkpoint",
    "not a checkpoint": "is not a checkpoint",
    "no state dict": "has no state dict",
    "wrong shape": "do not fit PlainNet: shape of net.0.weight: copying a param with shape torch.Size([4, 3])",
    "wrong keys": "do not fit PlainNet: missing net.0.weight; unexpected other.weight",
    "unsafe object": "refused the object argparse.Namespace; pass --trust-checkpoint",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_checkpoint_files_exit_2_with_one_line(case, tmp_path, capsys):
    files = _bad_files(tmp_path)
    code, out, err = _run(capsys, str(files[case]), "--model", f"{FX}:PlainNet", "--loss",
                          f"{FX}:half_squared_error", "--data", f"{FX}:make_loader", "--out", str(tmp_path / "o"),
                          "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("optdiag analyze: error: ")
    assert BAD_FILES[case] in err.replace('"', "").replace("'", "")
    assert not (tmp_path / "o").exists()  # nothing written on failure


def test_trust_checkpoint_loads_what_safe_loading_refuses(tmp_path, capsys):
    state = {"net.0.weight": fx.TARGET_MAP.clone()}
    torch.save({"state_dict": state, "args": argparse.Namespace(a=1)}, tmp_path / "object.ckpt")
    code, _, err = _run(capsys, str(tmp_path / "object.ckpt"), "--model", f"{FX}:PlainNet", "--loss",
                        f"{FX}:half_squared_error", "--data", f"{FX}:make_loader", "--out", str(tmp_path / "o"),
                        "--quiet", "--trust-checkpoint", *FAST)
    assert code == 0, err


BAD_INPUTS = {
    "model not MODULE:NAME": (["--model", "LinearNet"], "must be given as MODULE:NAME"),
    "unimportable module": (["--model", "no_such_module_xyz:Net"], "cannot import module 'no_such_module_xyz'"),
    "missing class": (["--model", f"{FX}:NoSuchNet"], "has no attribute 'NoSuchNet'"),
    "data raises": (["--model", f"{FX}:LinearNet", "--data", f"{FX}:raising_data"],
                    "raising_data raised RuntimeError: the dataset server is down"),
    "data empty": (["--model", f"{FX}:LinearNet", "--data", f"{FX}:empty_data"], "yielded no batches"),
    "data not data": (["--model", f"{FX}:LinearNet", "--data", f"{FX}:not_data"], "got int"),
    "no data at all": (["--model", f"{FX}:NoDataNet"], "has no train_dataloader; pass --data"),
    "no loss": (["--model", f"{FX}:PlainNet", "--data", f"{FX}:make_loader"], "no training_step"),
    "bad loss": (["--model", f"{FX}:LinearNet", "--loss", f"{FX}:not_a_callable_loss"],
                 "cannot be called as loss_fn(model, batch)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_modules_data_and_losses_exit_2_with_one_line(case, ckpt, tmp_path, capsys):
    argv, message = BAD_INPUTS[case]
    code, _, err = _run(capsys, ckpt, *argv, "--out", str(tmp_path / "o"), "--quiet", *FAST)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_argument_errors_exit_2(ckpt, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", ckpt, "--model", f"{FX}:LinearNet", "--max-batches", "0"])
    assert exit_.value.code == 2
    assert "at least 1" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(ckpt, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("user data")
    code, _, err = _run(capsys, ckpt, "--model", f"{FX}:LinearNet", "--out", str(target), "--quiet", *FAST)
    assert code == 2 and "not a directory" in err
    assert target.read_text() == "user data"


def test_checkpoint_file_is_unchanged(ckpt, tmp_path, capsys):
    before = (os.path.getmtime(ckpt), open(ckpt, "rb").read())
    assert _run(capsys, ckpt, "--model", f"{FX}:LinearNet", "--out", str(tmp_path), "--quiet", *FAST)[0] == 0
    assert (os.path.getmtime(ckpt), open(ckpt, "rb").read()) == before


@pytest.fixture(scope="module")
def bn_ckpt(tmp_path_factory):
    return fx.write_batchnorm_checkpoint(tmp_path_factory.mktemp("cli-bn") / "bn.ckpt")


def _bn_direct_loss(path, mode):
    """The BatchNormNet's mean loss over its data in ``mode``, dropout off, on a fresh copy (no state carried)."""
    model = fx.BatchNormNet.load_from_checkpoint(path, weights_only=True)
    model.train(mode == "train")
    model.net[2].eval()
    with torch.no_grad():
        return sum(float(fx.half_squared_error(model, b)) * len(b[0]) for b in fx.make_loader()) / fx.N_SAMPLES


@pytest.mark.parametrize("argv, mode", [([], "train"), (["--mode", "eval"], "eval"), (["--mode", "train"], "train")])
def test_mode_option_chooses_the_function_analysed(bn_ckpt, tmp_path, capsys, argv, mode):
    code, out, err = _run(capsys, bn_ckpt, "--model", f"{FX}:BatchNormNet", "--out", str(tmp_path), *FAST, *argv)
    assert code == 0, err
    ckpt = json.loads((tmp_path / "report.json").read_text())["checkpoints"][0]
    assert ckpt["mode"]["used"] == mode and ckpt["lambda_min_measured_on"]["mode"] == mode
    assert ckpt["loss"] == pytest.approx(_bn_direct_loss(bn_ckpt, mode), rel=1e-6)
    assert f"{mode} mode" in out and "analysed: the" in out
    assert ("training-mode function" if mode == "train" else "eval-mode function") in (
        tmp_path / "report.html").read_text()


def test_bad_mode_is_an_argument_error(ckpt, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["analyze", ckpt, "--model", f"{FX}:LinearNet", "--mode", "inference"])
    assert exit_.value.code == 2
    assert "invalid choice: 'inference'" in capsys.readouterr().err
