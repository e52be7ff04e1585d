"""Checkpoints that verify themselves and that no other run touches, and the driver's RNG state.

A run's checkpoints live in its own root (`<run folder>/checkpoints`, or a folder named after the
run inside `checkpoint.dir`); step k is `<root>/step_<k>` (zero-padded). Every loop (RL, SFT, DPO, reward model) writes them the same
way, through the shared driver (actors/driver.py).

Writing is atomic. Every role writes its part (DeepSpeed's engine state) into a staging folder
`step_<k>.<run id>.partial`, the driver writes `driver.pt` (step, data position, KL controller,
RNG states, held-out metrics), then `commit` hashes every file (sha256), writes `manifest.json`
(run id and name, step, the config fields a resume must match, size and sha256 per file, and a
checksum of the manifest itself), fsyncs every file and folder and renames the staging folder
into place. A crash at any moment leaves the whole checkpoint or none of it.

Reading: `latest_good` walks this run's checkpoints newest first, checks each one's sizes and
checksums, and returns the first intact one, logging every one it skips and why. Another run's
checkpoint is never used, and one written under a config that differs where it matters is
refused, naming the difference; `on_purpose` loads a checkpoint the user named
(checkpoint.resume_from), whoever wrote it.

Cleanup deletes only this run's checkpoints (the manifest names the run) beyond the newest
`keep_last`; another run's, or one whose manifest cannot be read, is left alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlhf.config import RunConfig

log = logging.getLogger("raylhf")

_COMMITTED = re.compile(r"^step_(\d+)$")
DRIVER_STATE, MANIFEST, FORMAT = "driver.pt", "manifest.json", 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, or a resume refused; the message says which and why."""


@dataclass(frozen=True)
class RunIdentity:
    """Who writes (and may resume) checkpoints: the run's id and name, and its config's
    `resume_fingerprint`."""

    run_id: str
    run_name: str
    fingerprint: dict[str, dict[str, Any]]  # resume_fingerprint's


def resume_fingerprint(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The config fields a resume must match, by kind. 'layout': what the checkpoint holds and how
    it is sharded (loading fails otherwise: always refused). 'model', 'data': what the weights and
    the saved data position mean (refused unless the user names the checkpoint on purpose)."""
    c = cfg.model_dump(mode="json")
    layout = {
        "algorithm.name": c["algorithm"]["name"],
        "algorithm.advantage": c["algorithm"]["advantage"],
        # the stage the policy's ranks run (zero_stage 'auto' resolved): what the optimizer files look like
        "trainer.zero_stage": cfg.trainer.stage_for(cfg.resources.policy.num_actors),
        "resources.policy.num_actors": c["resources"]["policy"]["num_actors"],
    }
    if cfg.models.policy is not None and cfg.models.policy.lora is not None:
        # a LoRA checkpoint holds adapters of this shape only (no base weights): nothing else loads it
        layout["models.policy.lora"] = c["models"]["policy"]["lora"]
    if cfg.models.critic is not None:
        layout["resources.critic.num_actors"] = c["resources"]["critic"]["num_actors"]
    if cfg.algorithm.name == "reward_model":  # the trained role is the reward model
        layout["resources.reward.num_actors"] = c["resources"]["reward"]["num_actors"]
    data = {f"data.{k}": c["data"][k] for k in ("source", "split", "task_kwargs", "train_size", "seed")}
    # through JSON: the fingerprint compares equal to the one read back from a manifest (tuples as lists)
    fingerprint: dict[str, dict[str, Any]] = json.loads(
        json.dumps({"layout": layout, "model": _flatten(c["models"], "models"), "data": _flatten(data, "")})
    )
    return fingerprint


def _flatten(tree: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}.{key}" if prefix else key)
    return out


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: checkpoint X, this config Y' for every field whose value differs."""
    missing = "<unset>"
    return [
        f"{key}: checkpoint {saved.get(key, missing)!r}, this config {current.get(key, missing)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, missing) != current.get(key, missing)
    ]


class CheckpointDir:
    def __init__(self, root: str | Path, run: RunIdentity, keep_last: int = 2) -> None:
        self.root = Path(root).resolve()  # absolute: actors on other processes write into it
        self.run = run
        self.keep_last = keep_last
        self.tag = run.run_id[:8]  # in the names of this run's staging folders

    def committed(self) -> list[tuple[int, Path]]:
        """(step, folder) of every published checkpoint in the root, whoever wrote it, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _COMMITTED.match(p.name)) and p.is_dir()]
        return sorted(found)

    def ours(self) -> list[tuple[int, Path]]:
        """The published checkpoints whose manifest names this run, oldest first."""
        return [(step, folder) for step, folder in self.committed() if _owner(folder) == self.run.run_id]

    # ---------------------------------------------------------------------------------- write
    def staging(self, step: int) -> Path:
        """An empty folder to write step `step` into; `commit(step)` publishes it."""
        path = self._staged(step)
        shutil.rmtree(path, ignore_errors=True)  # this run's own, left over from a crash mid-save
        path.mkdir(parents=True)
        return path

    def commit(self, step: int) -> Path:
        """Hash, write the manifest, fsync and publish the staged folder atomically; then delete
        this run's checkpoints beyond the newest `keep_last`."""
        started = time.perf_counter()
        staged, final = self._staged(step), self.root / f"step_{step:08d}"
        if not (staged / DRIVER_STATE).is_file():
            raise RuntimeError(f"{staged} has no {DRIVER_STATE}: the checkpoint was not fully written")
        files = _files(staged)
        digests = _sha256_all(staged, files, fsync=True)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "run_id": self.run.run_id,
            "run_name": self.run.run_name,
            "step": step,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": self.run.fingerprint,
            "files": {rel: {"size": (staged / rel).stat().st_size, "sha256": digests[rel]} for rel in files},
        }
        _write_synced(staged / MANIFEST, json.dumps(manifest | {"manifest_sha256": _digest(manifest)}, indent=1))
        for folder, _, _ in os.walk(staged):  # the new entries themselves reach the disk
            _fsync_dir(Path(folder))
        replaced = self._make_room(final) if final.exists() else None
        os.replace(staged, final)
        _fsync_dir(self.root)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        size = sum(m["size"] for m in manifest["files"].values())
        log.info(
            "checkpoint %s: %d files, %.0f MB, hashed and synced in %.1f s",
            final,
            len(files),
            size / 1e6,
            time.perf_counter() - started,
        )
        self._prune()
        return final

    def _staged(self, step: int) -> Path:
        return self.root / f"step_{step:08d}.{self.tag}.partial"

    def _make_room(self, final: Path) -> Path | None:
        """The same step saved again (a resumed run passing it once more): this run's old folder is
        moved aside, to be deleted once the new one is in place. Another run's is never touched."""
        try:
            manifest = read_manifest(final)
        except CheckpointError as e:  # cannot tell whose it is: keep it, under another name
            aside = final.with_name(f"{final.name}.unverified-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, aside)
            log.warning("%s was in the way and cannot be verified (%s); kept as %s", final, e, aside)
            return None
        if manifest.get("run_id") != self.run.run_id:
            raise CheckpointError(
                f"{final} belongs to another run ({_who(manifest)}); this run "
                f"({self.run.run_name!r}, id {self.run.run_id}) never replaces it: "
                "give each run its own checkpoint folder"
            )
        old = final.with_name(f"{final.name}.{self.tag}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        return old

    def _prune(self) -> None:
        for _, old in self.ours()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(f"step_*.{self.tag}.partial"):  # this run's crashed saves
            shutil.rmtree(leftover, ignore_errors=True)

    # ----------------------------------------------------------------------------------- read
    def latest_good(self, asked: bool = True) -> tuple[int, Path] | None:
        """This run's newest intact checkpoint, falling back to older ones (each skip logged with
        its reason); None when the root holds none at all. CheckpointError when this run's
        checkpoints are all damaged, when the newest intact one was written under a config that
        differs where it matters, or, if the user `asked` to resume, when only other runs'
        checkpoints are there."""
        skipped: list[str] = []
        others: list[tuple[Path, dict[str, Any]]] = []
        for step, folder in reversed(self.committed()):
            try:
                manifest = read_manifest(folder)
                if manifest["run_id"] != self.run.run_id:
                    others.append((folder, manifest))
                    continue
                if manifest["step"] != step:
                    raise CheckpointError(f"the folder's name says step {step}, its manifest step {manifest['step']}")
                verify_files(folder, manifest)
            except CheckpointError as e:
                skipped.append(f"{folder.name}: {e}")
                log.warning("checkpoint %s is damaged, skipped: %s", folder, e)
                continue
            refused, _ = self._mismatches(manifest, on_purpose=False)
            if refused:
                raise CheckpointError(
                    f"cannot resume from {folder}: it was written under a different config ({'; '.join(refused)}). "
                    f"Resume with the config it was written with, or start a new run from it on purpose: "
                    f"checkpoint.resume_from={folder}"
                )
            if skipped:
                log.warning(
                    "resuming from %s, the newest intact checkpoint of this run; skipped %d damaged newer one(s)",
                    folder,
                    len(skipped),
                )
            return step, folder
        if others:
            log.info(
                "%s: left alone %d checkpoint(s) of other runs (newest: %s, %s)",
                self.root,
                len(others),
                others[0][0].name,
                _who(others[0][1]),
            )
        if skipped:
            raise CheckpointError(
                f"no intact checkpoint of run {self.run.run_name!r} in {self.root}: "
                + "; ".join(skipped)
                + ". Nothing was changed; start a new run, or a new run from a checkpoint you trust with "
                "checkpoint.resume_from=<step folder>"
            )
        if asked and others:
            folder, manifest = others[0]
            raise CheckpointError(
                f"checkpoint.resume=true: {self.root} holds no checkpoint of this run ({self.run.run_name!r}, id "
                f"{self.run.run_id}); the newest there, {folder.name}, belongs to another run ({_who(manifest)}). "
                f"Continue that run with logging.run_name={manifest.get('run_name')} checkpoint.resume=true, or start "
                f"a new run from it on purpose with checkpoint.resume_from={folder}"
            )
        return None

    def on_purpose(self, path: str | Path) -> tuple[int, Path]:
        """A checkpoint the user named (checkpoint.resume_from): verified like any other, loaded
        whoever wrote it and whatever its model or data (each difference logged); refused only
        when it is damaged or cannot load into this config's layout."""
        folder = Path(path).expanduser().resolve()
        where = f"checkpoint.resume_from={path}"
        if not folder.is_dir():
            raise CheckpointError(f"{where}: no such folder")
        if not (folder / MANIFEST).exists() and any(_COMMITTED.match(p.name) for p in folder.iterdir()):
            raise CheckpointError(f"{where} is a folder of checkpoints: name one step_<k> folder inside it")
        try:
            manifest = read_manifest(folder)
            verify_files(folder, manifest)
        except CheckpointError as e:
            raise CheckpointError(f"{where}: the checkpoint is damaged: {e}") from None
        refused, noted = self._mismatches(manifest, on_purpose=True)
        if refused:
            raise CheckpointError(f"{where}: the checkpoint cannot load into this config ({'; '.join(refused)})")
        for difference in noted:
            log.warning("%s differs from this config, loaded on purpose: %s", where, difference)
        if manifest["run_id"] != self.run.run_id:
            log.info("starting from step %d of %s (%s), on purpose", manifest["step"], folder, _who(manifest))
        step: int = manifest["step"]  # read_manifest checked that it is an int
        return step, folder

    def _mismatches(self, manifest: dict[str, Any], on_purpose: bool) -> tuple[list[str], list[str]]:
        """(refused, noted) differences between the checkpoint's fingerprint and this run's."""
        saved, current = manifest.get("fingerprint") or {}, self.run.fingerprint
        refused: list[str] = []
        noted: list[str] = []
        for kind in ("layout", "model", "data"):
            found = differences(saved.get(kind, {}), current.get(kind, {}))
            (noted if on_purpose and kind != "layout" else refused).extend(found)
        return refused, noted


# ------------------------------------------------------------------------- manifest, checksums
def read_manifest(folder: Path) -> dict[str, Any]:
    """The checkpoint's manifest, its own checksum verified; CheckpointError saying what is wrong."""
    file = folder / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"no {MANIFEST} (not a complete checkpoint of this version)")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST} is not a format-{FORMAT} manifest")
    claimed = manifest.pop("manifest_sha256", None)
    if claimed != _digest(manifest):
        raise CheckpointError(f"{MANIFEST} does not match its own checksum: it changed after it was written")
    files = manifest.get("files")
    if not (
        isinstance(manifest.get("run_id"), str)
        and isinstance(manifest.get("step"), int)
        and isinstance(files, dict)
        and all(
            isinstance(m, dict) and isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()
        )
    ):
        raise CheckpointError(f"{MANIFEST} lacks run_id, step or the files' sizes and checksums")
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its size (a cheap check first, catching
    truncation) and its sha256 (catching any changed byte)."""
    files = manifest["files"]
    for rel, meta in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{MANIFEST} lists {rel!r}, outside the checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{rel} is missing")
        if (size := path.stat().st_size) != meta["size"]:
            raise CheckpointError(f"{rel} is {size} bytes, the manifest says {meta['size']} (truncated or overwritten)")
    for rel, digest in _sha256_all(folder, list(files), fsync=False).items():
        if digest != files[rel]["sha256"]:
            raise CheckpointError(f"{rel} does not match its sha256 in the manifest (its bytes changed after the save)")


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted POSIX paths relative to it."""
    return sorted(str((Path(d) / f).relative_to(folder).as_posix()) for d, _, names in os.walk(folder) for f in names)


def _sha256_all(folder: Path, files: list[str], fsync: bool) -> dict[str, str]:
    """sha256 of each file, several at once (hashlib releases the GIL); optionally fsynced too."""

    def one(rel: str) -> str:
        with open(folder / rel, "rb") as f:
            digest = _file_sha256(f)
            if fsync:
                os.fsync(f.fileno())
        return digest

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(files, pool.map(one, files)))


def _file_sha256(f: io.BufferedIOBase) -> str:
    """hashlib.file_digest(f, "sha256").hexdigest(), which Python 3.10 lacks (it came in 3.11).
    Large chunks: sha256 releases the GIL while it hashes them, so several files hash at once."""
    sha = hashlib.sha256()
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    while size := f.readinto(chunk):
        sha.update(view[:size])
    return sha.hexdigest()


def _digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _owner(folder: Path) -> str | None:
    try:
        run_id: str = read_manifest(folder)["run_id"]  # read_manifest checked that it is a string
        return run_id
    except CheckpointError:
        return None


def _who(manifest: dict[str, Any]) -> str:
    return f"run {manifest.get('run_name')!r}, id {manifest.get('run_id')}"


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------- RNG state
def rng_state() -> dict[str, Any]:
    """Python's and torch's global RNG states (numpy's too, when it is installed)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
