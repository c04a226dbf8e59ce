"""Curriculum loader: batch format, once-per-epoch splitting, exact resume, bad shards, config."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fusiontree.config import CurriculumStage, DataConfig, load_config
from fusiontree.data import (CorruptShardError, build_train_loader, build_val_loaders, load_tokenizer,
                             positions_from_doc_starts)
from fusiontree.data.tokenizer import train_tokenizer

GLOBAL, MICRO = 1024, 256  # 2 ranks: 2 micro-batches per rank per step


def data_cfg(root: Path, **kw) -> DataConfig:
    base = dict(shards_dir=str(root), global_batch_tokens=GLOBAL, micro_batch_tokens=MICRO, num_workers=2,
                prefetch_factor=2, curriculum=[CurriculumStage(seq_len=64, until_tokens=0)])
    base.update(kw)
    return DataConfig(**base)


def run_steps(loader, steps: int) -> list[tuple[int, list[int]]]:
    """(seq_len, sample ids) of every micro-batch of `steps` optimizer steps."""
    seen = []
    for _ in range(steps):
        for _ in range(loader.grad_accum_steps):
            batch = loader.next_batch()
            seen.append((batch["input_ids"].shape[1], batch["sample_id"].tolist()))
        loader.advance(loader.cfg.global_batch_tokens)
    return seen


def test_batch_format_and_boundaries(built):
    loader = build_train_loader(data_cfg(built[0], num_workers=0), rank=0, world_size=2, seed=0)
    assert loader.micro_batch_size == 4 and loader.grad_accum_steps == 2 and loader.seq_len == 64
    batch = loader.next_batch()
    assert set(batch) == {"input_ids", "position_ids", "seq_idx", "sample_id", "substituted"}
    ids, pos, seq = batch["input_ids"], batch["position_ids"], batch["seq_idx"]
    assert ids.dtype == torch.int64 and pos.dtype == torch.int64 and seq.dtype == torch.int32
    assert ids.shape == pos.shape == seq.shape == (4, 64) and batch["sample_id"].shape == (4,)
    assert int(ids.max()) < 400 and not batch["substituted"].any()
    starts = [torch.cat([torch.tensor([0]), torch.nonzero(torch.diff(s)).flatten() + 1]).numpy() for s in seq]
    want_pos, want_seq = positions_from_doc_starts(starts, 64)
    assert torch.equal(pos, torch.from_numpy(want_pos)) and torch.equal(seq, torch.from_numpy(want_seq))
    # after every eos inside a row a new document starts: position 0, next seq_idx
    eos_next = torch.nonzero(ids[:, :-1] == 3)
    assert len(eos_next) > 0
    for b, t in eos_next.tolist():
        assert pos[b, t + 1] == 0 and seq[b, t + 1] == seq[b, t] + 1


def test_each_sample_once_per_epoch_on_2_ranks_x_2_workers(built):
    manifest = json.loads((built[0] / "manifest.json").read_text())
    n = manifest["splits"]["train"]["buckets"]["64"]["samples"]
    # a micro-batch size that leaves an odd batch count per rank: the 2 workers get unequal shares
    B = next(b for b in (4, 2, 3, 5, 6, 7) if n // (2 * b) % 2 == 1)
    cfg = data_cfg(built[0], micro_batch_tokens=64 * B, global_batch_tokens=2 * 64 * B)
    loaders = [build_train_loader(cfg, rank=r, world_size=2, seed=3) for r in range(2)]
    nb = loaders[0].stats()["buckets"][64]["batches_per_epoch"]
    dropped = loaders[0].dropped_per_epoch(64)
    assert nb == n // (2 * B) and dropped == n - 2 * B * nb
    epochs = []
    for epoch in range(2):
        ids = []
        for loader in loaders:
            for _ in range(nb):  # exactly nb batches per rank per epoch: the next one starts the next epoch
                ids.extend(loader.next_batch()["sample_id"].tolist())
                loader.advance(cfg.global_batch_tokens)
                assert loader.epoch(64) == epoch
        counts = Counter(ids)
        assert max(counts.values()) == 1 and len(ids) == n - dropped
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # reshuffled
    for loader in loaders:
        loader.close()


def test_order_depends_on_seed_only(built):
    cfg = data_cfg(built[0], num_workers=0)
    a = run_steps(build_train_loader(cfg, 0, 2, seed=1), 3)
    b = run_steps(build_train_loader(cfg, 0, 2, seed=1), 3)
    c = run_steps(build_train_loader(cfg, 0, 2, seed=2), 3)
    assert a == b and a != c
    # one worker process reads the same order as reading in the training process
    assert run_steps(build_train_loader(data_cfg(built[0], num_workers=1), 0, 2, seed=1), 3) == a


def test_exact_resume_2_ranks_x_2_workers_across_epochs_and_a_stage_change(built):
    # 3 micro-batches per step on 2 workers: resuming after an odd count needs the workers re-dealt
    micro, glob = 512, 3 * 512 * 2
    probe = build_train_loader(data_cfg(built[0], num_workers=0, micro_batch_tokens=micro, global_batch_tokens=glob), 0, 2)
    nb = probe.stats()["buckets"][64]["batches_per_epoch"]  # micro-batches per rank per epoch of bucket 64
    stage1 = (3 * nb // 2) // 3  # steps at seq 64: about 1.5 epochs of its bucket; then 7 steps at seq 128
    total = stage1 + 7
    cfg = data_cfg(built[0], micro_batch_tokens=micro, global_batch_tokens=glob,
                   curriculum=[CurriculumStage(64, stage1 * glob), CurriculumStage(128, 0)])
    in_epoch1 = [c for c in range(nb // 3 + 1, stage1) if (3 * c - nb) % 2 == 1]
    cuts = [1, in_epoch1[0], stage1 + 1]  # odd positions: in epoch 0, in epoch 1, in stage 2
    if nb % 3 == 0:
        cuts.append(nb // 3)  # exactly at the end of epoch 0
    for rank in range(2):
        full_loader = build_train_loader(cfg, rank, 2, seed=11)
        full = run_steps(full_loader, total)
        full_loader.close()
        assert [L for L, _ in full] == [64] * (3 * stage1) + [128] * 21
        assert full_loader.epoch(64) == 1 and full_loader.stats()["buckets"][128]["batches"] == 21
        for cut in cuts:
            first = build_train_loader(cfg, rank, 2, seed=11)
            head = run_steps(first, cut)
            state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
            first.close()
            resumed = build_train_loader(cfg, rank, 2, seed=11)
            resumed.load_state_dict(state)
            tail = run_steps(resumed, total - cut)
            resumed.close()
            assert head + tail == full, (rank, cut)


def test_curriculum_geometry_and_step_protocol(built):
    cfg = data_cfg(built[0], num_workers=0, curriculum=[CurriculumStage(64, 2 * GLOBAL), CurriculumStage(256, 0)])
    loader = build_train_loader(cfg, 0, 2, seed=0)
    assert (loader.seq_len, loader.micro_batch_size, loader.grad_accum_steps) == (64, 4, 2)
    run_steps(loader, 2)
    assert (loader.seq_len, loader.micro_batch_size, loader.grad_accum_steps) == (256, 1, 2)
    assert loader.tokens_seen == 2 * GLOBAL
    with pytest.raises(RuntimeError, match="advance"):
        loader.advance(GLOBAL)  # no micro-batch of this step yet
    loader.next_batch()
    loader.next_batch()
    with pytest.raises(RuntimeError, match="call advance"):
        loader.next_batch()
    with pytest.raises(ValueError, match="summed over data-parallel ranks"):
        loader.advance(GLOBAL // 2)  # this rank's tokens only
    loader.advance(float(GLOBAL))


def test_truncated_shard_is_named_or_skipped_and_counted(shards_copy):
    manifest = json.loads((shards_copy / "manifest.json").read_text())
    victim = shards_copy / manifest["splits"]["train"]["buckets"]["64"]["shards"][1]["path"]
    victim.write_bytes(victim.read_bytes()[:1500])
    with pytest.raises(CorruptShardError, match=f"shard {victim}.*bytes but the manifest says"):
        build_train_loader(data_cfg(shards_copy, verify_shards="size"), 0, 2)
    # not verified up front: reading it fails and names it (raised through a worker process)
    loader = build_train_loader(data_cfg(shards_copy, verify_shards="none"), 0, 1, seed=0)
    with pytest.raises(CorruptShardError, match=f"shard {victim}"):
        run_steps(loader, 40)
    loader.close()
    # skip and count: every rank still gets its full epoch of full batches
    per_rank = []
    for rank in range(2):
        cfg = data_cfg(shards_copy, verify_shards="none", on_corrupt_shard="skip")
        loader = build_train_loader(cfg, rank, 2, seed=0)
        nb = loader.stats()["buckets"][64]["batches_per_epoch"]
        subs = 0
        for _ in range(nb):
            if loader._micro_in_step == 2:
                loader.advance(GLOBAL)
            batch = loader.next_batch()
            assert batch["input_ids"].shape == (4, 64)
            subs += int(batch["substituted"].sum())
        assert loader.epoch(64) == 0 and loader.stats()["substituted_samples"] == subs
        per_rank.append(subs)
        loader.close()
    # shard 1 held 8 samples; 1500 bytes keep at most one of them readable
    assert sum(per_rank) >= 7


def test_checksum_mismatch_is_an_error_naming_the_shard(shards_copy):
    manifest = json.loads((shards_copy / "manifest.json").read_text())
    victim = shards_copy / manifest["splits"]["train"]["buckets"]["64"]["shards"][0]["path"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # inside the first sample's tokens: same size, other content
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"shard {victim}: sha256 .* does not match"):
        # two ranks split the hashing; together they check every shard
        for rank in range(2):
            build_train_loader(data_cfg(shards_copy), rank, 2)
    build_train_loader(data_cfg(shards_copy, verify_shards="size"), 0, 2)  # the cheap check cannot see it


def test_val_loaders_are_fixed_and_split_across_ranks(built):
    cfg = data_cfg(built[0], curriculum=[CurriculumStage(64, GLOBAL), CurriculumStage(128, 0)])
    per_rank = [build_val_loaders(cfg, rank=r, world_size=2) for r in range(2)]
    assert list(per_rank[0]) == ["seq64", "seq128"]  # 256 is longer than every stage
    for name in per_rank[0]:
        a, b = per_rank[0][name], per_rank[1][name]
        assert len(a) == len(b) > 0
        ids_a = [x["sample_id"].tolist() for x in a]
        assert ids_a == [x["sample_id"].tolist() for x in a]  # re-iterable, same order
        ids_b = [x["sample_id"].tolist() for x in b]
        assert not set(sum(ids_a, [])) & set(sum(ids_b, []))


def _steps(loaders, steps: int) -> list[list[list[int]]]:
    """Per step, the sample ids of its micro-batch slots in slot order (rank by rank, each rank's
    accumulation micro-batches in order): what the step trains on, whatever the layout."""
    out = []
    for _ in range(steps):
        out.append([loader.next_batch()["sample_id"].tolist() for loader in loaders
                    for _ in range(loader.grad_accum_steps)])
        for loader in loaders:
            loader.advance(loader.cfg.global_batch_tokens)
    return out


def _resumed(cfg, world: int, state: dict) -> list:
    loaders = [build_train_loader(cfg, r, world, seed=4) for r in range(world)]
    for loader in loaders:
        loader.load_state_dict(json.loads(json.dumps(state)))
    return loaders


@pytest.mark.parametrize("old,new", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_reads_the_uninterrupted_steps(built, old, new):
    """A mid-epoch checkpoint of `old` data-parallel ranks (2 workers each) resumed on `new`
    ranks (in-process reading): every step until the last whole step of the epoch reads the
    uninterrupted run's samples slot for slot, so each sample of the epoch once; a resume
    inside that stretch, and a second change of size, keep it so; then the next epoch is the
    new layout's."""
    cfg_old, cfg_new = data_cfg(built[0], num_workers=2), data_cfg(built[0], num_workers=0)
    full = [build_train_loader(cfg_old, r, old, seed=4) for r in range(old)]
    nb, accum = full[0].stats()["buckets"][64]["batches_per_epoch"], full[0].grad_accum_steps
    whole = nb // accum  # whole steps in epoch 0 of the old layout
    assert whole >= 6
    want = _steps(full, whole)
    ids = [i for step in want for slot in step for i in slot]
    assert len(ids) == len(set(ids)) == whole * (GLOBAL // MICRO) * (MICRO // 64)

    cut, cut2 = whole // 3, 2 * whole // 3
    first = [build_train_loader(cfg_old, r, old, seed=4) for r in range(old)]
    got = _steps(first, cut)
    second = _resumed(cfg_new, new, first[0].state_dict())
    got += _steps(second, 1)
    third = _resumed(cfg_new, new, second[-1].state_dict())  # the same size again, inside the stretch
    got += _steps(third, cut2 - cut - 1)
    fourth = _resumed(cfg_old, old, third[0].state_dict())  # and back to the old size
    got += _steps(fourth, whole - cut2)
    assert got == want
    assert all(loader.epoch(64) == 1 for loader in fourth)  # the last whole step ended the epoch
    assert [loader.epoch(64) for loader in third] == [0] * new

    # then the new layout's epoch 1 from its start
    after = _resumed(cfg_new, new, third[0].state_dict())
    _steps(after, whole - cut2)
    fresh = [build_train_loader(cfg_new, r, new, seed=4) for r in range(new)]
    for loader in fresh:
        state = loader.state_dict()
        state["buckets"]["64"] = {"epoch": 1, "batches": 0}
        loader.load_state_dict(state)
    assert _steps(after, 2) == _steps(fresh, 2)
    assert all(loader.epoch(64) == 1 for loader in after)
    for loader in full + first + fourth:
        loader.close()


def test_resume_with_another_set_up_is_refused_or_starts_the_next_epoch(built):
    cfg = data_cfg(built[0], num_workers=0)
    loader = build_train_loader(cfg, 0, 2, seed=0)
    run_steps(loader, 3)
    state = loader.state_dict()
    other = build_train_loader(data_cfg(built[0], num_workers=0), 0, 2, seed=1)
    with pytest.raises(ValueError, match="seed: checkpoint 0 vs now 1.*resume_mismatch=next_epoch"):
        other.load_state_dict(state)
    lenient = build_train_loader(data_cfg(built[0], num_workers=0, micro_batch_tokens=128,
                                          resume_mismatch="next_epoch"), 0, 1, seed=0)
    lenient.load_state_dict(state)
    assert lenient.tokens_seen == 3 * GLOBAL and lenient.epoch(64) == 1


def test_tokenizer_must_match_the_shards(built, corpus_dir, tmp_path):
    sp = load_tokenizer(data_cfg(built[0]))
    assert sp.vocab_size() == 400 and sp.eos_id() == 3
    copy = tmp_path / "copy.model"
    copy.write_bytes((built[0] / "tokenizer.model").read_bytes())
    assert load_tokenizer(data_cfg(built[0], tokenizer=str(copy))).vocab_size() == 400
    other = tmp_path / "other.model"
    lines = [line for p in sorted(corpus_dir.glob("doc_00*.txt")) for line in p.read_text().splitlines()]
    other.write_bytes(train_tokenizer(lines, 350, num_threads=1, seed=0))
    with pytest.raises(ValueError, match="is not the one the shards"):
        load_tokenizer(data_cfg(built[0], tokenizer=str(other)))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(data_cfg(built[0], tokenizer=str(tmp_path / "missing.model")))


@pytest.mark.parametrize("override, match", [
    ("--data.global_batch_tokens=1000", "not a multiple of micro_batch_tokens"),
    ("--data.curriculum=[{seq_len: 96}]", "does not divide micro_batch_tokens"),
    ("--data.curriculum=[{seq_len: 64}, {seq_len: 128, until_tokens: 100}]", "needs a positive until_tokens"),
    ("--data.curriculum=[{seq_len: 64, until_tokens: 200}, {seq_len: 128, until_tokens: 100}]",
     "must exceed the previous stage"),
    ("--data.curriculum=[]", "curriculum is empty"),
    ("--data.verify_shards=md5", "is not one of"),
])
def test_config_errors_say_how_to_fix(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["--data.micro_batch_tokens=256", override])


def test_loader_errors_name_the_problem(built):
    with pytest.raises(ValueError, match=r"no train bucket of length 512; built buckets: \[64, 128, 256\]"):
        build_train_loader(data_cfg(built[0], micro_batch_tokens=512, global_batch_tokens=1024,
                                    curriculum=[CurriculumStage(512, 0)]), 0, 1)
    with pytest.raises(ValueError, match="multiple of micro_batch_tokens x data-parallel size = 256 x 8"):
        build_train_loader(data_cfg(built[0]), 0, 8)
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        build_train_loader(data_cfg(built[0], micro_batch_tokens=4096, global_batch_tokens=4096 * 64,
                                    curriculum=[CurriculumStage(256, 0)]), 0, 64)
    with pytest.raises(ValueError, match="no manifest.json"):
        build_train_loader(data_cfg(built[0] / "nowhere"), 0, 1)


def test_yaml_curriculum_round_trips(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("data:\n  micro_batch_tokens: 256\n  curriculum:\n    - {seq_len: 64, until_tokens: 4096}\n"
                 "    - {seq_len: 256}\n")
    cfg = load_config(p)
    assert cfg.data.curriculum == [CurriculumStage(64, 4096), CurriculumStage(256, 0)]


def test_reading_leaves_the_global_rng_alone(built):
    """Opening worker processes takes no number from torch's generator: a resumed run, which
    opens its loader at another step, keeps the uninterrupted run's RNG state."""
    loader = build_train_loader(data_cfg(built[0], num_workers=1), 0, 2, seed=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    run_steps(loader, 1)
    loader.close()
    assert torch.equal(torch.get_rng_state(), before)
