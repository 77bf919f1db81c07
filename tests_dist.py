"""Tests for torchrun DDP/FSDP in the shared training loop, --dry_run's memory estimate, and the bf16,
--tie_weights and --grad_accum_steps paths of pretrain.py (tiny configs, CPU, gloo)."""
import os
import shutil
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(HERE, "..", "shared", "tiktoken-cache"))
sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import pretrain  # noqa: E402
from data import UserError  # noqa: E402
from model import GPTModel, count_parameters, load_model, read_checkpoint  # noqa: E402

VERDICT = os.path.join(HERE, "..", "shared", "data", "the-verdict.txt")
TINY = ["--data", VERDICT, "--n_layers", "2", "--n_heads", "2", "--emb_dim", "32", "--context_length", "32",
        "--drop_rate", "0", "--sample_tokens", "0", "--eval_freq", "100", "--eval_iters", "1", "--epochs", "1",
        "--device", "cpu", "--dtype", "float32"]


def run(out_dir, *extra):
    return pretrain.main(TINY + ["--out_dir", str(out_dir), *extra])


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models run several times faster that way on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weights(path):
    return read_checkpoint(str(path))["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# Several processes: torch.multiprocessing starts 2 gloo processes the way torchrun does (same environment)
# ---------------------------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, runs, log_prefix):
    """One process of a torchrun-like launch: runs pretrain.main for each (argv, out_dir) and keeps a copy of each
    run's model.pth as model_<i>.pth; its stdout goes to log_prefix.<rank>."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.stdout = open(f"{log_prefix}.{rank}", "w", buffering=1)
    for i, (argv, out_dir) in enumerate(runs):
        pretrain.main(argv)
        if rank == 0 and "--dry_run" not in argv:
            shutil.copy(os.path.join(out_dir, "model.pth"), os.path.join(out_dir, f"model_{i}.pth"))
    sys.stdout.flush()


def test_ddp_and_fsdp_match_one_process_and_resume(tmp_path):
    # one process, batch 4: 2 steps, then resumed to 4
    one = tmp_path / "one"
    run(one, "--batch_size", "4", "--max_steps", "2")
    one_2 = weights(one / "model.pth")
    run(one, "--batch_size", "4", "--max_steps", "4", "--resume")
    one_4 = weights(one / "model.pth")

    # two processes, batch 2 each (same global batch): DDP and FSDP, each 2 steps then resumed to 4
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    runs = []
    for out, flags in ((ddp, []), (fsdp, ["--fsdp"])):
        base = TINY + ["--out_dir", str(out), "--batch_size", "2"] + flags
        runs += [(base + ["--max_steps", "2"], out), (base + ["--max_steps", "4", "--resume"], out)]
    runs.append((TINY + ["--out_dir", str(tmp_path / "dry"), "--batch_size", "2", "--dry_run"], None))
    log = str(tmp_path / "stdout")
    # fork: the processes start with torch, the optimizer and matplotlib already imported (saves ~10 s a process)
    torch.multiprocessing.start_processes(_worker, args=(2, _free_port(), runs, log), nprocs=2, join=True,
                                          start_method="fork")

    for out, first in ((ddp, 0), (fsdp, 2)):  # model_<i>.pth: what run i of the list wrote
        assert max_diff(weights(out / f"model_{first}.pth"), one_2) < 1e-5, out
        assert max_diff(weights(out / f"model_{first + 1}.pth"), one_4) < 1e-5, out
        state = read_checkpoint(str(out / pretrain.TRAIN_STATE))
        assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng_per_process"]) == 2
        assert not [k for k in state["model"] if k.startswith(("module.", "_orig_mod."))]
    # the same samples per step: the logs count the same global tokens
    assert read_checkpoint(str(ddp / pretrain.TRAIN_STATE))["tokens_seen"] == \
        read_checkpoint(str(one / pretrain.TRAIN_STATE))["tokens_seen"]

    printed = open(log + ".0").read()
    assert printed.count("DDP over 2 processes (gloo)") == 2  # the start-up line, once per run
    assert printed.count("FSDP over 2 processes (gloo)") == 2
    assert "2 processes" in printed and "--dry_run" in printed
    assert open(log + ".1").read() == ""  # rank 1 prints nothing
    assert not (tmp_path / "dry").exists()

    # a checkpoint of 2 processes cannot be resumed by 1
    with pytest.raises(UserError, match="written by 2 processes"):
        run(ddp, "--batch_size", "4", "--max_steps", "6", "--resume")


def test_fsdp_without_torchrun_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="torchrun --nproc_per_node"):
        run(tmp_path, "--fsdp", "--max_steps", "1")


def test_distributed_sampler_deals_out_the_one_process_order():
    # the sampler of process r takes every 2nd window of the permutation one process draws for (seed, epoch)
    from torch.utils.data import DistributedSampler, RandomSampler
    data = list(range(11))
    one = list(RandomSampler(data, generator=torch.Generator().manual_seed(7 * 1000 + 3)))
    shares = []
    for r in range(2):
        s = DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=7 * 1000, drop_last=True)
        s.set_epoch(3)
        shares.append(list(s))
    assert shares[0] == one[0:10:2] and shares[1] == one[1:10:2]
    assert pretrain.any_process(True) and not pretrain.any_process(False)  # one process: the flag itself
    assert pretrain.world_size() == 1 and pretrain.is_main_process() and pretrain.describe_distributed({}) == ""


# ---------------------------------------------------------------------------------------------------------------
# --dry_run and the memory estimate
# ---------------------------------------------------------------------------------------------------------------

def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    got = run(out, "--dry_run", "--batch_size", "2", "--grad_accum_steps", "3")
    text = capsys.readouterr().out
    assert not out.exists()
    for word in ("parameters", "trainable", "weights", "gradients", "AdamW state", "activations",
                 "tokens per step", "steps per epoch"):
        assert word in text
    cfg = pretrain.get_config(pretrain.DEFAULTS, TINY + ["--batch_size", "2"])
    model = GPTModel(pretrain.model_config(cfg))
    train_loader, _ = pretrain.make_loaders(open(VERDICT).read(), cfg)
    assert got["total_params"] == got["trainable_params"] == count_parameters(model)
    assert got["tokens_per_step"] == 2 * 32 * 3
    assert got["steps_per_epoch"] == len(train_loader) // 3
    assert got["weights"] == 4 * count_parameters(model) and got["optimizer"] == 2 * got["gradients"]


def test_memory_estimate_scales_as_it_should():
    cfg = pretrain.model_config(pretrain.get_config(pretrain.DEFAULTS, TINY))
    est = lambda **kw: pretrain.estimate_memory(cfg, **{"batch_size": 2, "context_length": 32, **kw})  # noqa: E731
    base = est()
    assert est(batch_size=4)["activations"] == 2 * base["activations"]
    assert est(batch_size=4)["weights"] == base["weights"]
    assert est(dtype=torch.bfloat16)["activations"] < base["activations"]
    frozen = est(trainable_params=1000, trainable_layers=1)
    assert frozen["optimizer"] == 8000 and frozen["activations"] < base["activations"]
    sharded = est(world_size=4, fsdp=True)
    assert sharded["optimizer"] == base["optimizer"] // 4 and sharded["total"] < base["total"]


# ---------------------------------------------------------------------------------------------------------------
# One process: bf16 autocast, tied weights, gradient accumulation
# ---------------------------------------------------------------------------------------------------------------

def test_bfloat16_trains_close_to_float32(tmp_path):
    fp32 = run(tmp_path / "fp32", "--max_steps", "4", "--lr", "2e-3")
    bf16 = run(tmp_path / "bf16", "--max_steps", "4", "--lr", "2e-3", "--dtype", "bfloat16")
    w32, w16 = weights(tmp_path / "fp32" / "model.pth"), weights(tmp_path / "bf16" / "model.pth")
    assert all(v.dtype == torch.float32 for v in w16.values())  # autocast keeps fp32 master weights
    assert max_diff(w32, w16) > 0  # the bf16 path really ran
    for k in ("train_loss", "val_loss"):
        assert abs(fp32[k] - bf16[k]) < 0.01, (k, fp32[k], bf16[k])
    first = read_checkpoint(str(tmp_path / "bf16" / pretrain.TRAIN_STATE))["log"][0]
    assert first["step"] == 1 and bf16["train_loss"] < first["train_loss"]  # it learned something


def test_tie_weights_shares_the_embedding_through_training_and_checkpoints(tmp_path):
    run(tmp_path, "--tie_weights", "--max_steps", "2")
    run(tmp_path, "--tie_weights", "--max_steps", "3", "--resume")
    model, ckpt = load_model(str(tmp_path / "model.pth"))
    assert ckpt["config"]["tie_weights"] is True
    assert model.out_head.weight is model.tok_emb.weight
    assert torch.equal(ckpt["model"]["out_head.weight"], ckpt["model"]["tok_emb.weight"])
    untied = GPTModel({**model.cfg, "tie_weights": False})
    assert count_parameters(untied) - count_parameters(model) == model.cfg["vocab_size"] * model.cfg["emb_dim"]
    with torch.no_grad():  # one tensor: a change to the embedding is a change to the output layer
        model.tok_emb.weight[0, 0] += 1.0
    assert model.out_head.weight[0, 0] == model.tok_emb.weight[0, 0]


def test_grad_accum_equals_one_big_batch(tmp_path):
    big = run(tmp_path / "big", "--batch_size", "4", "--max_steps", "3", "--lr", "1e-3")
    acc = run(tmp_path / "acc", "--batch_size", "2", "--grad_accum_steps", "2", "--max_steps", "3", "--lr", "1e-3")
    assert max_diff(weights(tmp_path / "big" / "model.pth"), weights(tmp_path / "acc" / "model.pth")) < 1e-5
    assert big["tokens_seen"] == acc["tokens_seen"] == 3 * 4 * 32
    single = run(tmp_path / "small", "--batch_size", "2", "--max_steps", "3", "--lr", "1e-3")
    assert max_diff(weights(tmp_path / "big" / "model.pth"), weights(tmp_path / "small" / "model.pth")) > 1e-4
