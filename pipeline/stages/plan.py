"""What a run will do before any work starts: pending and completed shards (with input
fingerprints, so a changed input is redone), and the one `_config.yaml` per output. Storage and
config only: no Ray, no torch, so `unlearnable status` starts in a second."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.config import ConfigError, PipelineConfig
from pipeline.io.output import OutputFolder
from pipeline.io.parquet_audio import list_parquet
from pipeline.io.shards import ShardRef, list_shards
from pipeline.io.storage import ShardError, fingerprint_changed, input_fingerprint
from pipeline.io.tree import UNIT_PREFIX, TreeFile, detect_layout, group_units, has_extension, list_tree, unit_id
from pipeline.records import ShardStats

FINGERPRINT_THREADS = 16  # parallel info / marker requests when planning
CONFIG_NAME = "_config.yaml"
AUDIO_SECTIONS = ("audio", "encoder", "attack")  # the settings of PipelineConfig.output_hash
IGNORED_SETTINGS = ("encoder.cache_dir", "encoder.device")


@dataclass
class RunPlan:
    """What a run will do, before any work starts."""

    shards: list[ShardRef]
    pending: list[ShardRef]
    skipped: list[str] = field(default_factory=list)  # shard ids already completed (resume)
    # completed shards whose input changed since (shard id, what changed): pending again
    changed: list[tuple[str, str]] = field(default_factory=list)
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # shard id -> input fingerprint


@dataclass
class InputListing:
    """What `io.input` holds: units of work (shards, Parquet files) or a tree's files."""

    layout: str  # shards | files | parquet
    units: list[ShardRef] = field(default_factory=list)  # shards and parquet layouts
    files: list[TreeFile] = field(default_factory=list)  # files layout: audio (and other files to copy)


def list_input(cfg: PipelineConfig) -> InputListing:
    """List `io.input` in its layout (`io.input_format`, or detected).

    Raises:
        ShardError: nothing to protect there, or it cannot be listed.
        ConfigError: in files mode the output lies inside the input tree or the other way round.
    """
    options = cfg.io.storage.storage_options()
    layout = cfg.io.input_format if cfg.io.input_format != "auto" else detect_layout(cfg.io.input, options)
    if layout == "shards":
        return InputListing(layout, units=list_shards(cfg.io.input, options))
    if layout == "parquet":
        return InputListing(layout, units=list_parquet(cfg.io.input, options))
    source, target = cfg.io.input.rstrip("/") + "/", cfg.io.output.rstrip("/") + "/"
    if source.startswith(target) or target.startswith(source):
        raise ConfigError(f"io.output ({cfg.io.output}) and io.input ({cfg.io.input}) must not contain each other")
    extensions = tuple(e.lower() for e in cfg.audio.extensions)
    files = list_tree(cfg.io.input, options)
    audio = [f for f in files if has_extension(f.rel, extensions)]
    if not audio:
        raise ShardError(f"no audio files ({', '.join(extensions)}) under {cfg.io.input}")
    return InputListing(layout, files=files if cfg.io.copy_other_files else audio)


def plan(cfg: PipelineConfig, listing: InputListing | list[ShardRef] | None = None) -> RunPlan:
    """List the input (unless given) and split its units into pending and already-completed ones.
    A completed unit whose input fingerprint (size, ETag / mtime) differs from the one in its
    marker is pending again and listed in `changed`. A tree's files are grouped into units here
    (see plan_files)."""
    options = cfg.io.storage.storage_options()
    if listing is None:
        listing = list_input(cfg)
    if isinstance(listing, InputListing):
        if listing.layout == "files":
            return plan_files(cfg, listing.files)
        listing = listing.units
    shards = listing
    out = OutputFolder(cfg.io.output, options)
    done = set() if cfg.io.overwrite else out.completed()
    with ThreadPoolExecutor(max_workers=FINGERPRINT_THREADS) as pool:
        prints = dict(zip([s.shard_id for s in shards], pool.map(lambda s: input_fingerprint(s.url, options), shards)))
        ids = sorted(s.shard_id for s in shards if s.shard_id in done)
        recorded = dict(zip(ids, pool.map(lambda i: _recorded_input(out, i), ids)))
    changed = []
    for shard_id in ids:
        why = fingerprint_changed(recorded[shard_id], prints[shard_id])
        if why:
            changed.append((shard_id, why))
            done.discard(shard_id)
    pending = [s for s in shards if s.shard_id not in done]
    skipped = sorted(s.shard_id for s in shards if s.shard_id in done)
    return RunPlan(shards=shards, pending=pending, skipped=skipped, changed=changed, fingerprints=prints)


def plan_files(cfg: PipelineConfig, files: list[TreeFile]) -> RunPlan:
    """Units of a file tree. Files recorded in the marker of a completed unit are done; the rest
    are grouped, in path order, into new units of at most `io.files_per_unit` files and
    `io.unit_max_mb` MiB, each named after its files (so a rerun after a crash plans the same
    units). A completed unit with a file whose fingerprint changed is pending again, whole, under
    its own id: its files are redone and its manifest replaced, so no file has two rows."""
    options = cfg.io.storage.storage_options()
    out = OutputFolder(cfg.io.output, options)
    done = set() if cfg.io.overwrite else {u for u in out.completed() if u.startswith(UNIT_PREFIX)}
    with ThreadPoolExecutor(max_workers=FINGERPRINT_THREADS) as pool:
        ids = sorted(done)
        recorded = dict(zip(ids, pool.map(lambda i: _recorded_input(out, i).get("files") or {}, ids)))
    current = {f.rel: f for f in files}
    assigned: set[str] = set()
    units, pending, skipped, changed = [], [], [], []
    prints: dict[str, dict[str, Any]] = {}
    for uid in ids:
        members = [current[rel] for rel in sorted(recorded[uid]) if rel in current]
        assigned.update(recorded[uid])
        ref = ShardRef(url=cfg.io.input, shard_id=uid, layout="files", files=tuple(f.rel for f in members))
        prints[uid] = {"files": {f.rel: f.fingerprint for f in members}}
        units.append(ref)
        whys = (f"{f.rel}: {w}" for f in members if (w := fingerprint_changed(recorded[uid][f.rel], f.fingerprint)))
        why = next(whys, "")
        if why and members:
            changed.append((uid, why))
            pending.append(ref)
        else:
            skipped.append(uid)
    limit = int(cfg.io.unit_max_mb * (1 << 20))
    for group in group_units([f for f in files if f.rel not in assigned], cfg.io.files_per_unit, limit):
        rels = [f.rel for f in group]
        ref = ShardRef(url=cfg.io.input, shard_id=unit_id(rels), layout="files", files=tuple(rels))
        prints[ref.shard_id] = {"files": {f.rel: f.fingerprint for f in group}}
        units.append(ref)
        pending.append(ref)
    return RunPlan(shards=units, pending=pending, skipped=sorted(skipped), changed=changed, fingerprints=prints)


def _recorded_input(out: OutputFolder, shard_id: str) -> dict[str, Any]:
    """The input fingerprint a shard's marker recorded ({} when none or unreadable)."""
    try:
        return ShardStats.from_json(out.read_text(out.marker_name(shard_id))).input
    except FileNotFoundError:
        return {}
    except ValueError:  # a damaged marker: the shard is redone
        return {"size": -1}


def check_config(out: OutputFolder, cfg: PipelineConfig, completed: set[str]) -> str:
    """Write `_config.yaml` once per output. When one is there, settings that change the audio must
    match it, unless `io.overwrite` or no shard is complete yet (then it is replaced).

    Returns:
        '' when the stored config stands, else a note saying it was written (or replaced, and why).

    Raises:
        ConfigError: the output holds completed shards made with other audio settings (names them).
    """
    if not out.exists(CONFIG_NAME):
        out.write_atomic(CONFIG_NAME, cfg.to_yaml().encode())
        return f"wrote {CONFIG_NAME}"
    old = yaml.safe_load(out.read_text(CONFIG_NAME)) or {}
    differ = config_differences(old if isinstance(old, dict) else {}, cfg.to_dict())
    if not differ:
        return ""
    listed = ", ".join(differ[:12]) + (f" (+{len(differ) - 12} more)" if len(differ) > 12 else "")
    if cfg.io.overwrite or not completed:
        out.write_atomic(CONFIG_NAME, cfg.to_yaml().encode())
        return f"replaced {CONFIG_NAME} ({listed})"
    raise ConfigError(
        f"{cfg.io.output} holds {len(completed)} shard(s) protected with other settings that change the audio: "
        f"{listed}. Rerun with the settings in {out.key(CONFIG_NAME)}, or pass --overwrite to redo every shard "
        "with the new ones, or choose another --output"
    )


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'section.key: old -> new' for every setting that changes the audio (audio, encoder except
    cache_dir/device, attack) present in both trees and different."""

    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        items: dict[str, Any] = {}
        for key, value in tree.items():
            items.update(flat(value, f"{prefix}.{key}"))
        return items

    found = []
    for section in AUDIO_SECTIONS:
        a, b = flat(old.get(section) or {}, section), flat(new.get(section) or {}, section)
        for key in sorted(a.keys() & b.keys()):
            if key not in IGNORED_SETTINGS and a[key] != b[key]:
                found.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return found
